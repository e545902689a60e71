#!/bin/sh
# Stagehand [switch] command for nginx: points the upstream at the new version's port and
# reloads nginx gracefully (old workers finish their requests; the agent stops the old
# version after its [service] drain). The agent runs it with PORT (the new version's
# port), STAGEHAND_PREVIOUS_PORT, STAGEHAND_VERSION, STAGEHAND_RELEASE_DIR, and the app's
# env from agent.toml: NGINX_UPSTREAM (the file nginx includes) and NGINX_RELOAD.
set -eu
: "${PORT:?the agent sets PORT}"
: "${NGINX_UPSTREAM:?set NGINX_UPSTREAM under [apps.<app>.env] in agent.toml}"
tmp="$NGINX_UPSTREAM.tmp.$$"
printf 'upstream stagehand_web {\n    server 127.0.0.1:%s;\n    keepalive 16;\n}\n' "$PORT" > "$tmp"
mv "$tmp" "$NGINX_UPSTREAM"
${NGINX_RELOAD:-nginx -s reload}
echo "nginx now sends stagehand_web to 127.0.0.1:$PORT (${STAGEHAND_VERSION:-})"
