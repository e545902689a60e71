#!/bin/sh
# Stagehand [switch] command for nginx: points the upstream at the new version's port and
# reloads nginx gracefully (old workers finish their requests; the agent stops the old
# version after its [service] drain). The agent runs it with PORT (the new version's
# port), STAGEHAND_PREVIOUS_PORT, STAGEHAND_VERSION, STAGEHAND_RELEASE_DIR, and the app's
# env from agent.toml: NGINX_UPSTREAM (the file nginx includes), NGINX_RELOAD, and
# NGINX_PID (nginx's pid file, default /run/nginx.pid).
#
# `nginx -s reload` only signals the master: until it has started workers with the new
# upstream, the old ones keep taking connections for the old port. This script returns
# once a new worker runs (up to 10 s), so the old version's drain starts after nginx moved.
set -eu
: "${PORT:?the agent sets PORT}"
: "${NGINX_UPSTREAM:?set NGINX_UPSTREAM under [apps.<app>.env] in agent.toml}"
tmp="$NGINX_UPSTREAM.tmp.$$"
printf 'upstream stagehand_web {\n    server 127.0.0.1:%s;\n    keepalive 16;\n}\n' "$PORT" > "$tmp"
mv "$tmp" "$NGINX_UPSTREAM"
master=$(cat "${NGINX_PID:-/run/nginx.pid}" 2>/dev/null || true)
workers() { if [ -n "$master" ]; then pgrep -P "$master" 2>/dev/null | sort; fi; }
before=$(workers)
${NGINX_RELOAD:-nginx -s reload}
if [ -n "$master" ] && [ -n "$before" ]; then
    i=0
    while [ "$i" -lt 100 ]; do
        # A worker that was not there before: the master took the new configuration.
        if workers | grep -vxF "$before" >/dev/null; then
            break
        fi
        sleep 0.1
        i=$((i + 1))
    done
fi
echo "nginx now sends stagehand_web to 127.0.0.1:$PORT (${STAGEHAND_VERSION:-})"
