//! The fleet page (SPEC §12), served with `/metrics` under `serve --http`: what runs where,
//! the agents, rollouts updating live, a host's receipts, the audit log.
//!
//! Access. `stagehand ui` is an admin request, so the operator's certificate authenticates
//! it; the controller answers with a one-time secret (10 minutes). The link carries the
//! secret in its fragment, which browsers never send, so it stays out of logs and
//! `Referer`; the login page posts it once and gets a session cookie (HttpOnly,
//! SameSite=Strict). Sessions live in memory: a restart signs everyone out. Every request
//! reads the identity again, so a revoked one is out at once. Each button goes through
//! [`admin::answer`], the admin channel's own path: the same authorisation, the same audit
//! entry. A form must come from the page's origin and carry the session's CSRF token.
//!
//! Live updates: `/events` is a stream of server-sent events, one per change to the fleet
//! (coalesced); the page's script then fetches its own view again, as HTML.

mod page;

use crate::admin;
use crate::server::Controller;
use crate::store::AdminRecord;
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::Markup;
use serde::Deserialize;
use stagehand_common::ids::now_secs;
use stagehand_common::protocol::{AdminRequest, AdminResponse, RolloutAction};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How long a login link may wait to be opened.
pub const LOGIN_TTL: Duration = Duration::from_secs(600);
/// A session ends after this long without a request (an open page's event stream counts)…
pub const SESSION_IDLE: Duration = Duration::from_secs(3600);
/// …and this long after it began, whatever happens.
pub const SESSION_MAX: Duration = Duration::from_secs(12 * 3600);
/// Bounds, in all and per identity (whose oldest goes first), so that no identity can lock
/// out the others: unused links, sessions, open event streams (in all and per session).
const MAX_LOGINS: usize = 256;
const LOGINS_PER_IDENTITY: usize = 8;
const MAX_SESSIONS: usize = 1024;
const SESSIONS_PER_IDENTITY: usize = 16;
const MAX_STREAMS: usize = 256;
const STREAMS_PER_SESSION: usize = 4;
/// The header the page's script sends to get only its live part.
const LIVE_HEADER: &str = "x-stagehand-live";
/// Changes closer together than this reach a page as one; with many pages open, each page
/// waits longer (50 ms more per page beyond four, at most 5 s), so that the views rebuilt
/// per second stay bounded.
const COALESCE: Duration = Duration::from_millis(300);

fn coalesce(open_streams: usize) -> Duration {
    (COALESCE + Duration::from_millis(50) * open_streams.saturating_sub(4) as u32).min(Duration::from_secs(5))
}

/// Secrets are looked up by their hash: what the maps hold cannot sign anyone in.
type Key = [u8; 32];

fn key_of(secret: &str) -> Key {
    *blake3::hash(secret.as_bytes()).as_bytes()
}

fn new_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

struct Login {
    who: String,
    expires: Instant,
}

struct Session {
    who: String,
    csrf: String,
    began: Instant,
    used: Instant,
    /// What the last button did, shown once on the next page.
    flash: Option<String>,
    /// Event streams this session has open.
    streams: usize,
}

impl Session {
    fn live(&self, now: Instant) -> bool {
        now.duration_since(self.used) < SESSION_IDLE && now.duration_since(self.began) < SESSION_MAX
    }
}

/// Logins and sessions of the fleet page.
#[derive(Default)]
pub struct Web {
    logins: Mutex<HashMap<Key, Login>>,
    sessions: Mutex<HashMap<Key, Session>>,
    streams: AtomicUsize,
    /// The page's base URL, once it is served.
    base_url: OnceLock<String>,
    /// The session cookie's name: one per controller (two on one host do not clash), with
    /// the `__Host-` prefix when the page is served over https.
    cookie_name: OnceLock<String>,
    /// `agents list` as of a fleet generation: open pages share it.
    agents: Mutex<Option<(u64, Arc<Vec<stagehand_common::protocol::AgentInfo>>)>>,
}

/// A request from a signed-in browser: the identity as it is now.
pub struct Signed {
    pub who: AdminRecord,
    pub csrf: String,
    pub flash: Option<String>,
    key: Key,
}

impl Web {
    /// The answer to `stagehand ui`: a one-time secret for `who`.
    pub fn issue_login(&self, who: &str) -> AdminResponse {
        let Some(base_url) = self.base_url.get().cloned() else {
            return AdminResponse::Error {
                message: "the controller serves no fleet page".into(),
                hint: "serve it with `stagehand controller serve --http ADDR`, or set `http` in controller.toml".into(),
            };
        };
        let now = Instant::now();
        let mut logins = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        logins.retain(|_, l| l.expires > now);
        // An identity's oldest unused link makes room for its newest.
        let mine: Vec<(Key, Instant)> =
            logins.iter().filter(|(_, l)| l.who == who).map(|(k, l)| (*k, l.expires)).collect();
        if mine.len() >= LOGINS_PER_IDENTITY {
            if let Some((oldest, _)) = mine.iter().min_by_key(|(_, at)| *at) {
                logins.remove(oldest);
            }
        }
        if logins.len() >= MAX_LOGINS {
            return AdminResponse::Error {
                message: format!("{MAX_LOGINS} login links are waiting to be used"),
                hint: format!(
                    "use one, or wait: each expires {} after it was made",
                    humantime::format_duration(LOGIN_TTL)
                ),
            };
        }
        let secret = new_secret();
        logins.insert(key_of(&secret), Login { who: who.to_string(), expires: now + LOGIN_TTL });
        AdminResponse::UiLogin { secret, expires_at: now_secs() + LOGIN_TTL.as_secs(), base_url: Some(base_url) }
    }

    /// Spends a login secret: a new session's cookie secret and the identity, if it was good.
    /// Room is made before the link is spent: sessions that ended or whose identity may no
    /// longer act go, then the identity's oldest beyond its share.
    fn sign_in(&self, ctl: &Controller, secret: &str) -> Option<(String, String)> {
        let key = key_of(secret);
        let now = Instant::now();
        let who = {
            let logins = self.logins.lock().unwrap_or_else(|p| p.into_inner());
            logins.get(&key).filter(|l| l.expires > now)?.who.clone()
        };
        admin::identity(ctl, &who).ok().filter(usable)?;
        let names: std::collections::HashSet<String> = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.values().map(|s| s.who.clone()).collect()
        };
        let gone: std::collections::HashSet<String> =
            names.into_iter().filter(|n| admin::identity(ctl, n).ok().filter(usable).is_none()).collect();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, s| s.live(now) && !gone.contains(&s.who));
        let mut mine: Vec<(Key, Instant)> =
            sessions.iter().filter(|(_, s)| s.who == who).map(|(k, s)| (*k, s.used)).collect();
        mine.sort_by_key(|(_, used)| *used);
        for (k, _) in mine.iter().take((mine.len() + 1).saturating_sub(SESSIONS_PER_IDENTITY)) {
            sessions.remove(k);
        }
        if sessions.len() >= MAX_SESSIONS {
            return None;
        }
        // Spent now, and only by one of two racing sign-ins.
        self.logins.lock().unwrap_or_else(|p| p.into_inner()).remove(&key)?;
        let cookie = new_secret();
        let session = Session { who: who.clone(), csrf: new_secret(), began: now, used: now, flash: None, streams: 0 };
        sessions.insert(key_of(&cookie), session);
        Some((cookie, who))
    }

    /// The session a request's cookie names, if it is live and its identity may still act;
    /// `take_flash` takes the message the last button left (for a whole page only).
    fn signed(&self, ctl: &Controller, headers: &HeaderMap, take_flash: bool) -> Option<Signed> {
        let name = self.cookie_name.get()?;
        cookies(headers, name).into_iter().find_map(|value| self.session(ctl, key_of(&value), take_flash))
    }

    fn session(&self, ctl: &Controller, key: Key, take_flash: bool) -> Option<Signed> {
        let now = Instant::now();
        let name = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.get(&key).filter(|s| s.live(now))?.who.clone()
        };
        // The identity as it is now, read without holding the sessions.
        let who = admin::identity(ctl, &name).ok().filter(usable);
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let Some(who) = who else {
            sessions.remove(&key);
            return None;
        };
        let s = sessions.get_mut(&key)?;
        s.used = now;
        let flash = if take_flash { s.flash.take() } else { None };
        Some(Signed { who, csrf: s.csrf.clone(), flash, key })
    }

    /// Counts an event stream of a session; false when it has its share open already.
    fn open_stream(&self, key: Key) -> bool {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get_mut(&key) {
            Some(s) if s.streams < STREAMS_PER_SESSION => {
                s.streams += 1;
                true
            }
            _ => false,
        }
    }

    fn close_stream(&self, key: Key) {
        if let Some(s) = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&key) {
            s.streams = s.streams.saturating_sub(1);
        }
    }

    /// Every agent as `agents list` shows it, built once per change to the fleet.
    pub fn agents(&self, ctl: &Controller) -> anyhow::Result<Arc<Vec<stagehand_common::protocol::AgentInfo>>> {
        let generation = ctl.fleet.generation();
        if let Some((g, list)) = &*self.agents.lock().unwrap_or_else(|p| p.into_inner()) {
            if *g == generation {
                return Ok(list.clone());
            }
        }
        let list = Arc::new(admin::list_agents(ctl)?);
        *self.agents.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, list.clone()));
        Ok(list)
    }

    fn set_flash(&self, key: Key, said: String) {
        if let Some(s) = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&key) {
            s.flash = Some(said);
        }
    }

    /// A `Set-Cookie` value for the session cookie.
    fn set_cookie(&self, value: &str, max_age: Duration) -> String {
        let name = self.cookie_name.get().map_or("stagehand", String::as_str);
        let secure = if self.base_url.get().is_some_and(|u| u.starts_with("https://")) { "; Secure" } else { "" };
        format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", max_age.as_secs())
    }

    fn sign_out(&self, key: Key) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    }
}

/// An identity that may use the page: not revoked (`identity` says so) and not expired.
fn usable(who: &AdminRecord) -> bool {
    who.expires_at == 0 || who.expires_at > now_secs()
}

/// The values of the cookie `name` in a request's `Cookie` headers (another site on the
/// same host may have set one of the same name: each is tried).
fn cookies(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| *n == name)
        .map(|(_, value)| value.to_string())
        .take(4)
        .collect()
}

/// Binds `addr` and serves the page and `/metrics` until the returned task is aborted.
pub async fn serve(
    ctl: &Arc<Controller>,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let base = ctl.config.http_url.clone().unwrap_or_else(|| format!("http://{bound}"));
    let base = base.trim_end_matches('/').to_string();
    let tag = &blake3::hash(format!("{base} {}", ctl.ca_fingerprint).as_bytes()).to_hex()[..8];
    let name =
        if base.starts_with("https://") { format!("__Host-stagehand-{tag}") } else { format!("stagehand-{tag}") };
    let _ = ctl.web.cookie_name.set(name);
    let _ = ctl.web.base_url.set(base);
    let app = router(Arc::downgrade(ctl));
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "The fleet page and /metrics stopped being served.");
        }
    });
    Ok((bound, task))
}

/// Handlers hold the controller weakly: a page left open must not keep a stopped
/// controller's database locked.
type Ctl = Weak<Controller>;

fn router(ctl: Ctl) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/agents", get(agents))
        .route("/agents/{id}", get(agent))
        .route("/rollouts", get(rollouts))
        .route("/rollouts/{id}", get(rollout))
        .route("/rollouts/{id}/{action}", post(control))
        .route("/audit", get(audit))
        .route("/events", get(events))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/static/app.js", get(|| async { asset("text/javascript; charset=utf-8", include_str!("app.js")) }))
        .route("/static/app.css", get(|| async { asset("text/css; charset=utf-8", include_str!("app.css")) }))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(ctl)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let cache = (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type)), cache], body).into_response()
}

/// Scripts and styles from the page's own origin only, never in a frame, no referrer to
/// other sites (a same-origin one keeps forms' `Origin` header, which `null` would lose); and
/// nothing of the fleet kept in a cache.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

fn gone() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "the controller is stopping").into_response()
}

/// What a browser without a session gets: how to sign in, nothing of the fleet.
fn signed_out(status: StatusCode, why: &str) -> Response {
    (status, page::signed_out(why)).into_response()
}

/// A page for a signed-in browser: the whole document, or only its live part when the
/// page's script asks for it. The view is built off the async threads (it reads the store).
async fn show<F>(ctl: Ctl, headers: HeaderMap, view: F) -> Response
where
    F: FnOnce(&Controller, &Signed) -> anyhow::Result<page::View> + Send + 'static,
{
    let live = headers.contains_key(LIVE_HEADER);
    let built = tokio::task::spawn_blocking(move || {
        let ctl = ctl.upgrade()?;
        let Some(signed) = ctl.web.signed(&ctl, &headers, !live) else {
            return Some(Err(signed_out(StatusCode::UNAUTHORIZED, "")));
        };
        let view = view(&ctl, &signed);
        Some(Ok((signed, view)))
    })
    .await
    .ok()
    .flatten();
    let (signed, view) = match built {
        None => return gone(),
        Some(Err(resp)) => return resp,
        Some(Ok(x)) => x,
    };
    match view {
        Ok(view) if live => view.body.into_response(),
        Ok(view) => page::layout(&view, &signed).into_response(),
        Err(e) if live => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "Could not build a page.");
            let failed = page::View::failed(&format!("{e:#}"));
            (StatusCode::INTERNAL_SERVER_ERROR, page::layout(&failed, &signed)).into_response()
        }
    }
}

async fn overview(State(ctl): State<Ctl>, headers: HeaderMap) -> Response {
    show(ctl, headers, page::overview).await
}

async fn agents(State(ctl): State<Ctl>, headers: HeaderMap, Query(q): Query<page::AgentQuery>) -> Response {
    show(ctl, headers, move |c, s| page::agents(c, s, &q)).await
}

async fn agent(State(ctl): State<Ctl>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    show(ctl, headers, move |c, s| page::agent(c, s, &id)).await
}

async fn rollouts(State(ctl): State<Ctl>, headers: HeaderMap, Query(q): Query<page::Paging>) -> Response {
    show(ctl, headers, move |c, s| page::rollouts(c, s, &q)).await
}

async fn rollout(State(ctl): State<Ctl>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    show(ctl, headers, move |c, s| page::rollout(c, s, &id)).await
}

async fn audit(State(ctl): State<Ctl>, headers: HeaderMap, Query(q): Query<page::Paging>) -> Response {
    show(ctl, headers, move |c, s| page::audit(c, s, &q)).await
}

async fn metrics(State(ctl): State<Ctl>) -> Response {
    let body = tokio::task::spawn_blocking(move || ctl.upgrade().map(|c| c.metrics.render(&c))).await.ok().flatten();
    match body {
        Some(body) => ([(header::CONTENT_TYPE, stagehand_common::http::METRICS_CONTENT_TYPE)], body).into_response(),
        None => gone(),
    }
}

async fn login_page() -> Markup {
    page::login()
}

#[derive(Deserialize)]
struct LoginForm {
    secret: String,
}

async fn login(State(weak): State<Ctl>, headers: HeaderMap, Form(f): Form<LoginForm>) -> Response {
    let Some(ctl) = weak.upgrade() else { return gone() };
    if let Err(refused) = same_origin(&ctl, &headers) {
        return refused.into_response();
    }
    drop(ctl);
    // Store reads and the audit log's fsync: off the async threads.
    let done = tokio::task::spawn_blocking(move || {
        let ctl = weak.upgrade()?;
        let Some((secret, who)) = ctl.web.sign_in(&ctl, f.secret.trim()) else {
            return Some(Err(signed_out(
                StatusCode::UNAUTHORIZED,
                "That link was used already, has expired, or its identity may no longer sign in.",
            )));
        };
        if let Err(e) = ctl.audit.record(&who, "ui-session", serde_json::json!({}), "ok") {
            tracing::error!(error = %format!("{e:#}"), "Could not write the audit log.");
            ctl.web.sign_out(key_of(&secret));
            let why = "the audit log cannot be written: see the controller's log";
            return Some(Err((StatusCode::SERVICE_UNAVAILABLE, why).into_response()));
        }
        tracing::info!(%who, "Signed in to the fleet page.");
        Some(Ok(ctl.web.set_cookie(&secret, SESSION_MAX)))
    })
    .await
    .ok()
    .flatten();
    match done {
        None => gone(),
        Some(Err(resp)) => resp,
        Some(Ok(cookie)) => see_other("/", Some(cookie)),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

/// Ends the session (a session that already ended is fine) and clears the cookie.
async fn logout(State(ctl): State<Ctl>, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    let Some(ctl) = ctl.upgrade() else { return gone() };
    match checked_form(&ctl, &headers, &f.csrf) {
        Ok(signed) => ctl.web.sign_out(signed.key),
        Err(Refusal::SignedOut) => {}
        Err(refused) => return refused.into_response(),
    }
    let mut resp = signed_out(StatusCode::OK, "Signed out.");
    if let Ok(v) = HeaderValue::from_str(&ctl.web.set_cookie("", Duration::ZERO)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// A rollout's pause, resume or abort button: the admin request, as the session's identity.
async fn control(
    State(ctl): State<Ctl>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let Some(ctl) = ctl.upgrade() else { return gone() };
    let signed = match checked_form(&ctl, &headers, &f.csrf) {
        Ok(s) => s,
        Err(refused) => return refused.into_response(),
    };
    let action = match action.as_str() {
        "pause" => RolloutAction::Pause,
        "resume" => RolloutAction::Resume,
        "abort" => RolloutAction::Abort,
        _ => return (StatusCode::NOT_FOUND, "no such action").into_response(),
    };
    let req = AdminRequest::ControlRollout { id: id.clone(), action };
    let said = match admin::answer(&ctl, req, &signed.who.name, None).await {
        Ok(AdminResponse::Rollout { notes, .. }) => notes.join("; "),
        Ok(AdminResponse::Error { message, hint }) => format!("Refused: {message}. Next: {hint}."),
        Ok(other) => format!("Unexpected answer: {}", crate::cli::describe(&other)),
        Err(e) => format!("Failed: {e:#}"),
    };
    let status = if said.starts_with("Refused") || said.starts_with("Failed") { "refused" } else { "ok" };
    tracing::info!(rollout = %id, ?action, who = %signed.who.name, %status, "A fleet page button.");
    ctl.web.set_flash(signed.key, said);
    see_other(&format!("/rollouts/{}", page::path_segment(&id)), None)
}

/// Why a form post was refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    CrossOrigin,
    SignedOut,
    Csrf,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::CrossOrigin => {
                (StatusCode::FORBIDDEN, "refused: the form was not sent from this page").into_response()
            }
            Refusal::SignedOut => signed_out(StatusCode::UNAUTHORIZED, "Your session has ended."),
            Refusal::Csrf => {
                (StatusCode::FORBIDDEN, "the form's CSRF token does not match this session: reload the page")
                    .into_response()
            }
        }
    }
}

/// A form post: from the page's own origin, by a live session, with its CSRF token.
fn checked_form(ctl: &Controller, headers: &HeaderMap, csrf: &str) -> Result<Signed, Refusal> {
    same_origin(ctl, headers)?;
    let signed = ctl.web.signed(ctl, headers, false).ok_or(Refusal::SignedOut)?;
    if !constant_time_eq(csrf.as_bytes(), signed.csrf.as_bytes()) {
        return Err(Refusal::Csrf);
    }
    Ok(signed)
}

/// Refuses a request a browser says came from another site (`Sec-Fetch-Site`) or another
/// origin: `Origin` must be the page's (`http_url`, behind a proxy that rewrites `Host`) or
/// this `Host`'s. SameSite=Strict and the CSRF token guard as well.
fn same_origin(ctl: &Controller, headers: &HeaderMap) -> Result<(), Refusal> {
    same_origin_as(ctl.config.http_url.as_deref(), headers)
}

fn same_origin_as(page: Option<&str>, headers: &HeaderMap) -> Result<(), Refusal> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let cross_site = text(header::HeaderName::from_static("sec-fetch-site"))
        .is_some_and(|site| site != "same-origin" && site != "none");
    let page_origin = page.map(|u| {
        let u = u.trim_end_matches('/');
        match u.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://{}", rest.split('/').next().unwrap_or(rest)),
            None => u.to_string(),
        }
    });
    let foreign = match text(header::ORIGIN) {
        None => false,
        Some(origin) if page_origin.as_deref().is_some_and(|p| p.eq_ignore_ascii_case(origin)) => false,
        Some(origin) => match (origin.split_once("://"), text(header::HOST)) {
            (Some((_, rest)), Some(host)) => !rest.eq_ignore_ascii_case(host),
            _ => true,
        },
    };
    if cross_site || foreign {
        return Err(Refusal::CrossOrigin);
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn see_other(to: &str, cookie: Option<String>) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// Counts an open event stream, in all and for its session; uncounts it when dropped.
struct StreamSlot(Ctl, Key);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Some(c) = self.0.upgrade() {
            c.web.streams.fetch_sub(1, Ordering::Relaxed);
            c.web.close_stream(self.1);
        }
    }
}

/// Server-sent events: `change` when the fleet changed (coalesced, see [`coalesce`]),
/// `signed-out` when the session ended; keep-alive comments in between.
async fn events(State(weak): State<Ctl>, headers: HeaderMap) -> Response {
    let Some(ctl) = weak.upgrade() else { return gone() };
    let Some(signed) = ctl.web.signed(&ctl, &headers, false) else {
        return signed_out(StatusCode::UNAUTHORIZED, "");
    };
    if ctl.web.streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        ctl.web.streams.fetch_sub(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "too many open fleet pages").into_response();
    }
    if !ctl.web.open_stream(signed.key) {
        ctl.web.streams.fetch_sub(1, Ordering::Relaxed);
        return (StatusCode::TOO_MANY_REQUESTS, "this session has too many fleet pages open").into_response();
    }
    let slot = StreamSlot(weak.clone(), signed.key);
    let changes = ctl.fleet.subscribe();
    drop(ctl);
    struct Stream {
        ctl: Ctl,
        changes: tokio::sync::watch::Receiver<u64>,
        key: Key,
        ended: bool,
        _slot: StreamSlot,
    }
    let state = Stream { ctl: weak, changes, key: signed.key, ended: false, _slot: slot };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        loop {
            // Wakes at least every half minute to see that the session still holds.
            let changed = tokio::time::timeout(Duration::from_secs(30), s.changes.changed()).await;
            if matches!(changed, Ok(Err(_))) {
                return None;
            }
            let (ctl, key) = (s.ctl.clone(), s.key);
            let valid = tokio::task::spawn_blocking(move || {
                let ctl = ctl.upgrade()?;
                Some((ctl.web.session(&ctl, key, false).is_some(), ctl.web.streams.load(Ordering::Relaxed)))
            })
            .await
            .ok()
            .flatten();
            let (valid, open) = valid?;
            if !valid {
                s.ended = true;
                return Some((Ok::<_, std::convert::Infallible>(Event::default().event("signed-out").data("")), s));
            }
            if changed.is_ok() {
                tokio::time::sleep(coalesce(open)).await;
                let n = *s.changes.borrow_and_update();
                return Some((Ok(Event::default().event("change").data(n.to_string())), s));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; stagehand-ab=x; b=2; stagehand-ab=y"));
        assert_eq!(cookies(&h, "stagehand-ab"), ["x", "y"]);
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("stagehand-abx=abc"));
        assert!(cookies(&h, "stagehand-ab").is_empty());
    }

    #[test]
    fn forms_from_another_origin_are_refused() {
        let with = |page: Option<&str>, pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            same_origin_as(page, &h).is_ok()
        };
        let local = ("host", "127.0.0.1:9100");
        assert!(with(None, &[local, ("origin", "http://127.0.0.1:9100")]));
        assert!(with(None, &[local]));
        assert!(!with(None, &[local, ("origin", "http://evil.example")]));
        assert!(!with(None, &[local, ("origin", "null")]));
        assert!(!with(None, &[local, ("sec-fetch-site", "cross-site")]));
        assert!(!with(None, &[local, ("sec-fetch-site", "same-site")]));
        assert!(with(None, &[local, ("sec-fetch-site", "same-origin")]));
        // Behind a proxy that sends its own Host: the configured URL's origin.
        let page = Some("https://stagehand.example/");
        assert!(with(page, &[local, ("origin", "https://stagehand.example")]));
        assert!(!with(page, &[local, ("origin", "http://stagehand.example")]));
        assert!(!with(page, &[local, ("origin", "https://evil.example")]));
    }

    #[test]
    fn sessions_end_when_idle_or_old() {
        let now = Instant::now();
        let at = |began: u64, used: u64| Session {
            who: "a".into(),
            csrf: String::new(),
            began: now - Duration::from_secs(began),
            used: now - Duration::from_secs(used),
            flash: None,
            streams: 0,
        };
        assert!(at(10, 5).live(now));
        assert!(!at(SESSION_IDLE.as_secs() + 10, SESSION_IDLE.as_secs() + 1).live(now));
        assert!(!at(SESSION_MAX.as_secs() + 1, 1).live(now));
    }

    #[test]
    fn many_open_pages_are_told_less_often() {
        assert_eq!(coalesce(1), COALESCE);
        assert_eq!(coalesce(24), COALESCE + Duration::from_secs(1));
        assert_eq!(coalesce(10_000), Duration::from_secs(5));
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
