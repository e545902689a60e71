//! The fleet page's views, server-rendered with maud (which escapes every value). Each view
//! is its page's live part; [`layout`] wraps it in the document. Views count and page
//! rather than list: a fleet of 1,000 agents is a few numbers per environment and app,
//! and 100 agents per page.

use super::Signed;
use crate::access::{check, Need};
use crate::admin;
use crate::server::Controller;
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use stagehand_common::ids::now_secs;
use stagehand_common::protocol::{AgentInfo, HostView, Receipt, ReceiptOutcome, RolloutView, WaveView};
use stagehand_common::AgentId;
use std::collections::BTreeMap;

/// Agents, rollouts and audit entries per page.
const PER_PAGE: usize = 100;
/// A wave with more hosts than this shows counts on the overview, and its hosts folded.
const CHIPS: usize = 40;
/// Agents named per environment on the overview (the agents page lists them all).
const NAMED: usize = 24;

/// One page's title and live part.
pub struct View {
    pub title: String,
    pub body: Markup,
}

impl View {
    pub fn failed(why: &str) -> View {
        View {
            title: "Error".into(),
            body: html! { section.card { h2 { "This page could not be built" } pre.log { (why) } } },
        }
    }
}

/// `?page=N` (1-based).
#[derive(Debug, Default, Deserialize)]
pub struct Paging {
    #[serde(default)]
    pub page: usize,
}

/// The agents page's filters.
#[derive(Debug, Default, Deserialize)]
pub struct AgentQuery {
    /// An environment, or empty for all.
    #[serde(default)]
    pub env: String,
    /// `connected`, `disconnected`, `revoked`, or empty for all.
    #[serde(default)]
    pub state: String,
    /// Part of a name, id or label.
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub page: usize,
}

/// The document around a view: navigation, who is signed in, and the live part.
pub fn layout(view: &View, signed: &Signed) -> Markup {
    let who = &signed.who;
    let scope = if who.envs.is_empty() { String::new() } else { format!(" in {}", who.envs.join(", ")) };
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(&view.title))
            body {
                header.top {
                    a.brand href="/" { "Stagehand" }
                    nav {
                        a href="/" { "Fleet" }
                        a href="/agents" { "Agents" }
                        a href="/rollouts" { "Rollouts" }
                        a href="/audit" { "Audit" }
                    }
                    span #live-state .idle title="Updates arrive as the fleet changes" { "connecting" }
                    span.who { (who.name) " · " (who.role) (scope) }
                    form.inline method="post" action="/logout" {
                        input type="hidden" name="csrf" value=(signed.csrf);
                        button.link type="submit" { "Sign out" }
                    }
                }
                @if let Some(flash) = &signed.flash {
                    div.flash role="status" { (flash) }
                }
                main #live { (view.body) }
            }
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Stagehand" }
            link rel="stylesheet" href="/static/app.css";
            script src="/static/app.js" defer {}
        }
    }
}

/// The login page: its script posts the link's fragment once.
pub fn login() -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body.center {
                section.card.narrow {
                    h1 { "Stagehand" }
                    form #login method="post" action="/login" {
                        input type="hidden" name="secret";
                        p #login-note { "This one-time link signs this browser in to the fleet page." }
                        button #sign-in type="submit" { "Sign in" }
                        noscript { p { "This page needs JavaScript to read its link." } }
                    }
                }
            }
        }
    }
}

/// What a browser without a session sees: how to get one, and nothing of the fleet.
pub fn signed_out(why: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Signed out"))
            body.center {
                section.card.narrow #signed-out {
                    h1 { "Stagehand" }
                    @if !why.is_empty() { p { (why) } }
                    p { "To see the fleet, get a one-time link from the controller:" }
                    pre { "stagehand ui" }
                    p.muted { "It signs this browser in as your operator identity." }
                }
            }
        }
    }
}

/// Environments × apps × versions, rollouts in flight, and the latest ones.
pub fn overview(ctl: &Controller, signed: &Signed) -> anyhow::Result<View> {
    #[derive(Default)]
    struct AppRow {
        released: Option<String>,
        live: BTreeMap<String, usize>,
        none: usize,
        staged: BTreeMap<String, usize>,
        failed: usize,
    }
    #[derive(Default)]
    struct EnvRow {
        agents: usize,
        connected: usize,
        revoked: usize,
        apps: BTreeMap<String, AppRow>,
        /// The first few agents, named on the overview.
        named: Vec<usize>,
    }
    let agents = ctl.web.agents(ctl)?;
    let mut envs: BTreeMap<String, EnvRow> = BTreeMap::new();
    for (i, a) in agents.iter().enumerate() {
        let env = envs.entry(a.env.clone()).or_default();
        if a.revoked {
            env.revoked += 1;
            continue;
        }
        env.agents += 1;
        env.connected += usize::from(a.connected);
        if env.named.len() < NAMED {
            env.named.push(i);
        }
        for app in &a.apps {
            let row = env.apps.entry(app.app.clone()).or_default();
            match &app.active {
                Some(v) => *row.live.entry(v.clone()).or_default() += 1,
                None => row.none += 1,
            }
            for v in &app.staged {
                *row.staged.entry(v.clone()).or_default() += 1;
            }
            row.failed += app.failed.len();
        }
    }
    for (name, env) in envs.iter_mut() {
        for (app, d) in ctl.store.desired_in(name)? {
            env.apps.entry(app).or_default().released = Some(d.version.clone());
        }
    }
    let order = env_order(ctl, envs.keys());
    let rollouts = ctl.store.rollouts()?;
    let active: Vec<RolloutView> =
        rollouts.iter().rev().filter(|r| !r.state.is_final()).map(|r| crate::rollout::view(ctl, r)).collect();
    let recent: Vec<RolloutView> =
        rollouts.iter().rev().filter(|r| r.state.is_final()).take(8).map(|r| crate::rollout::view(ctl, r)).collect();
    let total = agents.iter().filter(|a| !a.revoked).count();
    let connected = agents.iter().filter(|a| a.connected && !a.revoked).count();
    let body = html! {
        section.summary {
            div.stat { b #agents-connected { (connected) } " of " b { (total) } " agents connected" }
            div.stat { (count_b(envs.len(), "environment")) }
            div.stat { (count_b(active.len(), "rollout")) " in flight" }
        }
        h2 { "Rollouts in flight" }
        @if active.is_empty() { p.muted #no-rollouts { "None. " a href="/rollouts" { "Past rollouts" } } }
        @for r in &active { (rollout_card(r, signed, true)) }
        h2 { "Environments" }
        @if envs.is_empty() { p.muted { "No agents yet: " code { "stagehand token create --env ENV" } " makes a join token." } }
        @for name in &order {
            @let env = &envs[name];
            section.card.env data-env=(name) {
                h3 {
                    a href={ "/agents?env=" (query(name)) } { (name) }
                    span.muted { " · " (env.connected) " of " (env.agents) " agents connected" }
                    @if env.revoked > 0 { span.muted { " · " (env.revoked) " revoked" } }
                }
                @if env.apps.is_empty() { p.muted { "Nothing deployed here yet." } } @else {
                    table.apps {
                        thead { tr { th { "App" } th { "Released" } th { "Live" } th { "Staged" } th { "Failed stagings" } } }
                        tbody {
                            @for (app, row) in &env.apps {
                                tr data-app=(app) {
                                    td { b { (app) } }
                                    td { @if let Some(v) = &row.released { span.ver { (v) } } @else { span.muted { "—" } } }
                                    td.live {
                                        @for (v, n) in &row.live {
                                            @let drift = row.released.as_ref().is_some_and(|r| r != v);
                                            span.chip.ver.drift[drift] data-version=(v) title={ (n) " hosts run " (v) } { (v) " ×" (n) }
                                        }
                                        @if row.none > 0 { span.chip.muted title="hosts with nothing live" { "none ×" (row.none) } }
                                    }
                                    td {
                                        @for (v, n) in &row.staged { span.chip.muted { (v) " ×" (n) } }
                                    }
                                    td { @if row.failed > 0 { span.bad { (row.failed) } } @else { span.muted { "0" } } }
                                }
                            }
                        }
                    }
                }
                div.env-agents {
                    @for &i in &env.named { (agent_chip(&agents[i])) }
                    @if env.agents > env.named.len() {
                        a href={ "/agents?env=" (query(name)) } { "all " (env.agents) " agents →" }
                    }
                }
            }
        }
        h2 { "Latest rollouts" }
        (rollout_table(&recent))
    };
    Ok(View { title: "Fleet".into(), body })
}

/// An agent, connected or not, with what is live on it.
fn agent_chip(a: &AgentInfo) -> Markup {
    html! {
        a.chip.agent.offline[!a.connected] href={ "/agents/" (path_segment(&a.id.0)) } data-agent=(a.name)
            title=(if a.connected { "connected" } else { "disconnected" }) {
            b { (a.name) }
            @for app in &a.apps {
                " " (app.app) " " span.ver.live-version { (app.active.as_deref().unwrap_or("—")) }
            }
        }
    }
}

/// Environments in promotion order, then the others by name.
fn env_order<'a>(ctl: &Controller, present: impl Iterator<Item = &'a String>) -> Vec<String> {
    let present: Vec<&String> = present.collect();
    let order = &ctl.config.environments.order;
    let mut out: Vec<String> = order.iter().filter(|e| present.contains(e)).cloned().collect();
    out.extend(present.into_iter().filter(|e| !order.contains(e)).cloned());
    out
}

/// A rollout with its waves; `compact` folds big waves to counts.
fn rollout_card(r: &RolloutView, signed: &Signed, compact: bool) -> Markup {
    let may = check(&signed.who, &Need::Release(r.env.clone())).is_ok();
    let ended = matches!(r.state.as_str(), "succeeded" | "failed" | "aborted" | "rejected" | "planned");
    html! {
        section.card.rollout #{ "rollout-" (r.id) } data-state=(r.state) {
            h3 {
                a href={ "/rollouts/" (path_segment(&r.id)) } { (r.app) " " span.ver { (r.version) } " → " (r.env) }
                " " span.badge.(class_of(&r.state)) .state { (r.state) }
                @if r.pause_requested && r.state == "running" { " " span.badge.idle { "pausing" } }
                @if r.kind != "release" { " " span.badge.idle { (r.kind) } }
            }
            p.muted {
                (r.id) " · by " (r.requested_by) " · " (ago(r.created_at))
                @if r.traffic < 100 { " · " (r.traffic) "% of traffic" }
                " · wave " (r.wave as usize + 1) " of " (r.waves.len())
                @if r.bake_secs > 0 { " · bake " (humantime::format_duration(std::time::Duration::from_secs(r.bake_secs))) }
            }
            @if !r.reason.is_empty() { p.reason { (r.reason) } }
            @if r.approvals_needed > 0 || !r.approvals.is_empty() {
                p.approvals {
                    "Approvals " (r.approvals.len()) " of " (r.approvals_needed)
                    @for a in &r.approvals { " · " (a.by) " " (ago(a.at / 1000)) }
                    @if r.state == "awaiting-approval" {
                        " · another identity than " (r.requested_by) " runs " code { "stagehand approve " (r.id) }
                    }
                }
            }
            @if let (Some(t), "awaiting-window") = (r.window_opens.filter(|t| *t > 0), r.state.as_str()) {
                p.window { "Waits for its release window, opening " (humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))) }
            }
            @if may && !ended {
                div.actions {
                    @if r.state == "running" && !r.pause_requested { (button(r, "pause", "Pause", signed)) }
                    @if r.state == "paused" || r.pause_requested { (button(r, "resume", "Resume", signed)) }
                    (button(r, "abort", "Abort", signed))
                }
            }
            ol.waves {
                @for (i, w) in r.waves.iter().enumerate() {
                    li.wave data-state=(w.state) .current[i == r.wave as usize && !ended] {
                        span.wave-name { "Wave " (i + 1) } " " span.badge.(class_of(&w.state)) { (w.state) }
                        " " span.muted { (count(w.hosts.len(), "host")) }
                        (wave_hosts(r, i, w, compact))
                    }
                }
            }
            @if !r.skipped.is_empty() {
                p.muted { "Skipped: " @for h in &r.skipped { (host_chip(h)) } }
            }
        }
    }
}

fn button(r: &RolloutView, action: &str, label: &str, signed: &Signed) -> Markup {
    let confirm =
        (action == "abort").then(|| format!("Abort rollout {} of {} {} in {}?", r.id, r.app, r.version, r.env));
    html! {
        form.inline method="post" action={ "/rollouts/" (path_segment(&r.id)) "/" (action) } data-confirm=[confirm] {
            input type="hidden" name="csrf" value=(signed.csrf);
            button.(action) type="submit" data-action=(action) { (label) }
        }
    }
}

fn wave_hosts(r: &RolloutView, i: usize, w: &WaveView, compact: bool) -> Markup {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &w.hosts {
        *counts.entry(h.state.as_str()).or_default() += 1;
    }
    html! {
        @if compact && w.hosts.len() > CHIPS {
            div.counts {
                @for (state, n) in &counts { span.chip.(class_of(state)) { (state) " " (n) } }
                " " a href={ "/rollouts/" (path_segment(&r.id)) } { "hosts" }
            }
        } @else if compact {
            div.hosts { @for h in &w.hosts { (host_chip(h)) } }
        } @else {
            div.counts { @for (state, n) in &counts { span.chip.(class_of(state)) { (state) " " (n) } } }
            details #{ "wave-" (i) } open[w.hosts.len() <= 200] {
                summary { "Hosts" }
                table.hosts {
                    thead { tr { th { "Host" } th { "State" } th { "Before" } th { "Receipt" } th { "Detail" } } }
                    tbody {
                        @for h in &w.hosts {
                            tr data-host=(h.name) data-state=(h.state) {
                                td { a href={ "/agents/" (path_segment(&h.id.0)) } { (h.name) } @if !h.connected { " " span.muted { "(offline)" } } }
                                td { span.badge.(class_of(&h.state)) { (h.state) } }
                                td { @if let Some(p) = &h.previous { span.ver { (p) } } @else { span.muted { "—" } } }
                                td { @if let Some(rc) = &h.receipt { (outcome(rc)) " " span.muted { (ago(rc.at)) } } }
                                td.detail { (h.detail) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn host_chip(h: &HostView) -> Markup {
    let title = if h.detail.is_empty() { h.state.clone() } else { format!("{}: {}", h.state, h.detail) };
    html! {
        a.chip.host.(class_of(&h.state)) href={ "/agents/" (path_segment(&h.id.0)) } title=(title) data-host=(h.name) data-state=(h.state) { (h.name) }
    }
}

fn rollout_table(rs: &[RolloutView]) -> Markup {
    html! {
        @if rs.is_empty() { p.muted { "None yet." } } @else {
            table.rollouts {
                thead { tr { th { "Rollout" } th { "App" } th { "Version" } th { "Env" } th { "State" } th { "By" } th { "Started" } th { "Hosts" } } }
                tbody {
                    @for r in rs {
                        @let hosts: usize = r.waves.iter().map(|w| w.hosts.len()).sum();
                        tr data-rollout=(r.id) {
                            td { a href={ "/rollouts/" (path_segment(&r.id)) } { (r.id) } }
                            td { (r.app) } td { span.ver { (r.version) } } td { (r.env) }
                            td { span.badge.(class_of(&r.state)) { (r.state) } }
                            td { (r.requested_by) } td { (ago(r.created_at)) } td { (hosts) }
                        }
                    }
                }
            }
        }
    }
}

/// Every rollout, newest first, paged.
pub fn rollouts(ctl: &Controller, _signed: &Signed, q: &Paging) -> anyhow::Result<View> {
    let all = ctl.store.rollouts()?;
    let (page, pages, skip) = paging(all.len(), q.page);
    let shown: Vec<RolloutView> =
        all.iter().rev().skip(skip).take(PER_PAGE).map(|r| crate::rollout::view(ctl, r)).collect();
    let body = html! {
        h2 { "Rollouts" span.muted { " · " (all.len()) } }
        (rollout_table(&shown))
        (pager("/rollouts?", page, pages))
    };
    Ok(View { title: "Rollouts".into(), body })
}

/// One rollout: its waves and every host, with receipts.
pub fn rollout(ctl: &Controller, signed: &Signed, id: &str) -> anyhow::Result<View> {
    let Some(r) = ctl.store.rollout(id)? else {
        return Ok(View {
            title: "No such rollout".into(),
            body: html! { p { "No rollout " (id) ". " a href="/rollouts" { "All rollouts" } } },
        });
    };
    let view = crate::rollout::view(ctl, &r);
    let body = html! {
        (rollout_card(&view, signed, false))
        p.muted {
            "Digest " code { (view.digest.to_hex()) } " · max unhealthy " (view.max_unhealthy)
            " · offline hosts: " (view.offline)
            @if let Some(end) = view.ended_at { " · ended " (ago(end)) }
        }
    };
    Ok(View { title: format!("Rollout {id}"), body })
}

/// Agents, filtered and paged.
pub fn agents(ctl: &Controller, _signed: &Signed, q: &AgentQuery) -> anyhow::Result<View> {
    let all = ctl.web.agents(ctl)?;
    let envs = env_order(ctl, all.iter().map(|a| &a.env).collect::<std::collections::BTreeSet<_>>().into_iter());
    let needle = q.q.trim().to_lowercase();
    let matches = |a: &AgentInfo| {
        (q.env.is_empty() || a.env == q.env)
            && match q.state.as_str() {
                "connected" => a.connected && !a.revoked,
                "disconnected" => !a.connected && !a.revoked,
                "revoked" => a.revoked,
                _ => true,
            }
            && (needle.is_empty()
                || a.name.to_lowercase().contains(&needle)
                || a.id.0.contains(&needle)
                || a.labels.iter().chain(a.own_labels.iter()).any(|(k, v)| format!("{k}={v}").contains(&needle)))
    };
    let shown: Vec<&AgentInfo> = all.iter().filter(|a| matches(a)).collect();
    let (page, pages, skip) = paging(shown.len(), q.page);
    let connected = shown.iter().filter(|a| a.connected).count();
    let base = format!("/agents?env={}&state={}&q={}&", query(&q.env), query(&q.state), query(&q.q));
    let body = html! {
        h2 { "Agents" span.muted { " · " (shown.len()) " shown, " (connected) " connected, of " (all.len()) } }
        form.filters method="get" action="/agents" {
            select name="env" {
                option value="" { "every environment" }
                @for e in &envs { option value=(e) selected[*e == q.env] { (e) } }
            }
            select name="state" {
                @for (v, label) in [("", "any state"), ("connected", "connected"), ("disconnected", "disconnected"), ("revoked", "revoked")] {
                    option value=(v) selected[v == q.state] { (label) }
                }
            }
            input type="search" name="q" value=(q.q) placeholder="name, id or label";
            button type="submit" { "Filter" }
        }
        table.agents {
            thead { tr { th { "Agent" } th { "Env" } th { "State" } th { "Last seen" } th { "Agent version" } th { "Labels" } th { "Apps: live (staged)" } } }
            tbody {
                @for a in shown.iter().skip(skip).take(PER_PAGE) {
                    tr data-agent=(a.name) {
                        td { a href={ "/agents/" (path_segment(&a.id.0)) } { (a.name) } }
                        td { (a.env) }
                        td { (agent_state(a)) }
                        td { @if a.connected { "now" } @else if a.last_seen == 0 { span.muted { "never" } } @else { (ago(a.last_seen)) } }
                        td { @if let Some(v) = &a.version { (v) } @else { span.muted { "—" } } }
                        td { (labels(a)) }
                        td {
                            @for app in &a.apps {
                                div.app-line data-app=(app.app) {
                                    b { (app.app) } ": "
                                    @if let Some(v) = &app.active { span.ver.live-version { (v) } } @else { span.muted { "none" } }
                                    @let staged: Vec<&str> = app.staged.iter().map(String::as_str).filter(|v| Some(*v) != app.active.as_deref()).collect();
                                    @if !staged.is_empty() { span.muted { " (" (staged.join(", ")) ")" } }
                                    @if !app.failed.is_empty() { " " span.bad title="stagings failed" { "✗" (app.failed.len()) } }
                                }
                            }
                        }
                    }
                }
            }
        }
        (pager(&base, page, pages))
    };
    Ok(View { title: "Agents".into(), body })
}

fn agent_state(a: &AgentInfo) -> Markup {
    html! {
        @if a.revoked { span.badge.bad { "revoked" } }
        @else if a.connected { span.badge.ok { "connected" } }
        @else { span.badge.idle { "disconnected" } }
    }
}

fn labels(a: &AgentInfo) -> Markup {
    html! {
        @for (k, v) in &a.labels { span.chip.label { (k) "=" (v) } }
        @for (k, v) in &a.own_labels { span.chip.label.own title="the agent's own label: shown, never used to select" { (k) "=" (v) } }
    }
}

/// One agent: labels, and per app what is live and staged, with its last receipt and output.
pub fn agent(ctl: &Controller, _signed: &Signed, id: &str) -> anyhow::Result<View> {
    let id = AgentId(id.to_string());
    let Some(rec) = ctl.store.agent(&id)? else {
        return Ok(View {
            title: "No such agent".into(),
            body: html! { p { "No agent " (id.0) ". " a href="/agents" { "All agents" } } },
        });
    };
    let a = admin::agent_info(ctl, rec)?;
    let mut receipts = Vec::new();
    for app in &a.apps {
        receipts.push(ctl.store.receipt(&a.id, &app.app)?);
    }
    let body = html! {
        section.card {
            h2 { (a.name) " " (agent_state(&a)) }
            table.facts {
                tr { th { "Id" } td { code { (a.id.0) } } }
                tr { th { "Environment" } td { (a.env) } }
                tr { th { "Last seen" } td { @if a.connected { "now" } @else if a.last_seen == 0 { "never" } @else { (ago(a.last_seen)) " (" (when(a.last_seen)) ")" } } }
                tr { th { "Agent version" } td { @if let Some(v) = &a.version { (v) } @else { "—" } } }
                tr { th { "Labels" } td { (labels(&a)) } }
            }
        }
        @for (app, receipt) in a.apps.iter().zip(&receipts) {
            section.card.app data-app=(app.app) {
                h3 { (app.app) }
                table.facts {
                    tr { th { "Live" } td { @if let Some(v) = &app.active { span.ver.live-version { (v) } } @else { span.muted { "nothing" } } } }
                    tr { th { "Staged" } td { @for v in &app.staged { span.chip.ver { (v) } } } }
                    @for (v, why) in &app.failed { tr { th { "Staging failed" } td { span.ver { (v) } " " span.bad { (why) } } } }
                }
                @if let Some(rc) = receipt {
                    h4 { "Last receipt" }
                    table.facts {
                        tr { th { "Outcome" } td { (outcome(rc)) } }
                        tr { th { "Version" } td { span.ver { (rc.version) } " · seq " (rc.seq) } }
                        tr { th { "When" } td { (when(rc.at)) " (" (ago(rc.at)) ")" } }
                        tr { th { "Took" } td { "checked in " (ms(rc.check_us)) ", switched in " (ms(rc.switch_us)) ", " (ms(rc.total_us)) " in all" } }
                    }
                    h4 { "Hook and health output" }
                    @if rc.log.is_empty() { p.muted { "No output." } } @else { pre.log { (rc.log) } }
                }
            }
        }
        @if a.apps.is_empty() { p.muted { "No app is deployed to this agent yet." } }
    };
    Ok(View { title: format!("Agent {}", a.name), body })
}

/// The newest audit entries, paged.
pub fn audit(ctl: &Controller, _signed: &Signed, q: &Paging) -> anyhow::Result<View> {
    let (_, total) = ctl.audit.newest(0, 0);
    let kept = (total as usize).min(crate::audit::RECENT);
    let (page, pages, skip) = paging(kept, q.page);
    let (entries, _) = ctl.audit.newest(skip, PER_PAGE);
    let body = html! {
        h2 { "Audit log" span.muted { " · " (total) " entries" } }
        @if total as usize > kept {
            p.muted { "The newest " (kept) " are shown here; " code { "stagehand audit --data-dir DIR" } " on the controller's host reads them all." }
        }
        table.audit {
            thead { tr { th { "#" } th { "When" } th { "Who" } th { "What" } th { "Outcome" } th { "Arguments" } } }
            tbody {
                @for e in &entries {
                    tr {
                        td { (e.n) } td title=(when(e.at)) { (ago(e.at)) }
                        td { @if let Some(id) = e.who.strip_prefix("agent:") { a href={ "/agents/" (path_segment(id)) } { (e.who) } } @else { (e.who) } }
                        td { (e.what) }
                        td { @if e.outcome == "ok" { span.ok-text { "ok" } } @else { span.bad { (e.outcome) } } }
                        td.args { code { (e.args.to_string()) } }
                    }
                }
            }
        }
        (pager("/audit?", page, pages))
    };
    Ok(View { title: "Audit log".into(), body })
}

fn outcome(rc: &Receipt) -> Markup {
    html! {
        @match &rc.outcome {
            ReceiptOutcome::Committed => span.badge.ok { "committed" },
            ReceiptOutcome::Refused(why) => span.badge.bad title=(why.to_string()) { "refused: " (why.code()) },
            ReceiptOutcome::Scheduled { until } => span.badge.busy { "scheduled for " (when(*until)) },
        }
    }
}

/// (page shown, pages, items to skip) for `n` items and a 1-based page asked for.
fn paging(n: usize, asked: usize) -> (usize, usize, usize) {
    let pages = n.div_ceil(PER_PAGE).max(1);
    let page = asked.clamp(1, pages);
    (page, pages, (page - 1) * PER_PAGE)
}

fn pager(base: &str, page: usize, pages: usize) -> Markup {
    html! {
        @if pages > 1 {
            nav.pager {
                @if page > 1 { a href={ (base) "page=" (page - 1) } { "← newer" } }
                span.muted { " page " (page) " of " (pages) " " }
                @if page < pages { a href={ (base) "page=" (page + 1) } { "older →" } }
            }
        }
    }
}

/// The CSS class of a state's colour.
fn class_of(state: &str) -> &'static str {
    match state {
        "committed" | "passed" | "succeeded" | "reverted" => "ok",
        "failed" | "aborted" | "rejected" | "not-reverted" | "no-answer" => "bad",
        "sent" | "scheduled" | "in-progress" | "baking" | "running" | "reverting" | "rolling-back" | "staging-gate" => {
            "busy"
        }
        _ => "idle",
    }
}

/// A count in bold, then its noun.
fn count_b(n: usize, what: &str) -> Markup {
    html! { b { (n) } " " (if n == 1 { what.to_string() } else { format!("{what}s") }) }
}

/// `1 host`, `3 hosts`.
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `n minutes ago`, from Unix seconds.
fn ago(at: u64) -> String {
    let now = now_secs();
    if at == 0 {
        return "never".into();
    }
    let d = now.saturating_sub(at);
    match d {
        0..=4 => "just now".into(),
        5..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86_399 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

fn when(at: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at)).to_string()
}

fn ms(us: u64) -> String {
    format!("{:.0} ms", us as f64 / 1000.0)
}

/// A value in a URL path: unreserved characters as they are, the rest percent-encoded.
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A value in a query string (the same encoding).
fn query(s: &str) -> String {
    path_segment(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_clamps_to_what_exists() {
        assert_eq!(paging(0, 0), (1, 1, 0));
        assert_eq!(paging(250, 0), (1, 3, 0));
        assert_eq!(paging(250, 3), (3, 3, 200));
        assert_eq!(paging(250, 9), (3, 3, 200));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(path_segment("r-12.a_b~"), "r-12.a_b~");
        assert_eq!(path_segment("a/b?c d"), "a%2Fb%3Fc%20d");
    }

    #[test]
    fn values_are_escaped() {
        let m = html! { p { ("<script>alert(1)</script>") } };
        assert_eq!(m.into_string(), "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>");
    }
}
