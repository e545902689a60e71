//! The fleet page (SPEC §12) in a real browser, headless Chromium over WebDriver: it names
//! every agent and what is live, follows a rollout by itself, its pause button pauses, a
//! viewer gets no buttons and a forged one is refused; and over plain HTTP, what a
//! browser without a session, another origin, a used link or a revoked identity gets.

use crate::STAGEHAND;
use fantoccini::Locator;
use stagehand_common::protocol::{AdminRequest, AdminResponse, RolloutSpec};
use stagehand_tests::browser::Browser;
use stagehand_tests::{http_request, run_cli, Fleet, TestAgent};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const TOML: &str = "[health]\ncommand = \"test -f VERSION\"\nretries = 1\ninterval = \"10ms\"\ntimeout = \"5s\"\n";

fn tree(root: &Path, version: &str) -> PathBuf {
    let dir = root.join(format!("src-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("VERSION"), version).unwrap();
    std::fs::write(dir.join("stagehand.toml"), TOML).unwrap();
    dir
}

/// Pushes and stages `versions` of `web` in each environment of `envs`.
async fn stage(fleet: &Fleet, envs: &[&str], versions: &[&str]) {
    for v in versions {
        fleet.push("web", v, &tree(fleet.path(), v)).await.unwrap();
        for env in envs {
            assert!(fleet.deploy("web", v, env, 60).await.unwrap().all_done());
        }
    }
}

/// `stagehand ui` as the identity whose credentials are in `creds`: the link it prints.
fn login_link(fleet: &Fleet, creds: &Path) -> String {
    let out = run_cli(STAGEHAND, Some(fleet), &["--credentials", creds.to_str().unwrap(), "ui"]).unwrap();
    assert!(out.status.success(), "stagehand ui: {}", String::from_utf8_lossy(&out.stderr));
    let link = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(link.contains("/login#"), "{link}");
    link
}

/// Opens a login link and presses Sign in. Before the press, the secret has already left
/// the address bar.
async fn open_link(browser: &Browser, link: &str) {
    browser.client.goto(link).await.unwrap();
    let button = browser.client.wait().for_element(Locator::Css("#sign-in")).await.unwrap();
    let url = browser.client.current_url().await.unwrap();
    assert_eq!((url.path(), url.fragment()), ("/login", None), "the secret stays in the address bar");
    button.click().await.unwrap();
}

fn http_of(fleet: &Fleet) -> SocketAddr {
    fleet.controller.as_ref().unwrap().http.expect("the controller serves HTTP")
}

/// An identity of `role`, made through the CLI; its credentials directory.
fn identity(fleet: &Fleet, name: &str, role: &str) -> PathBuf {
    identity_in(fleet, name, role, None)
}

/// An identity of `role`, limited to `env` if given.
fn identity_in(fleet: &Fleet, name: &str, role: &str, env: Option<&str>) -> PathBuf {
    let dir = fleet.path().join(format!("creds-{name}"));
    let mut args = vec!["admin", "add", name, "--role", role, "--out", dir.to_str().unwrap()];
    if let Some(env) = env {
        args.extend(["--env", env]);
    }
    let out = run_cli(STAGEHAND, Some(fleet), &args).unwrap();
    assert!(out.status.success(), "admin add: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

async fn agents(fleet: &Fleet, env: &str, names: &[&str]) -> Vec<TestAgent> {
    let mut out = Vec::new();
    for n in names {
        out.push(fleet.agent(env, n).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_names_every_agent_and_live_version_and_nothing_without_a_session() {
    let fleet = Fleet::start_http().await.unwrap();
    let _prod = agents(&fleet, "prod", &["p1", "p2"]).await;
    let _lab = agents(&fleet, "lab", &["s1"]).await;
    stage(&fleet, &["prod", "lab"], &["v1"]).await;
    assert!(fleet.release("web", "v1", "prod").await.unwrap().all_done());
    let Some(browser) = Browser::start(fleet.path()).await.unwrap() else { return };
    let base = format!("http://{}", http_of(&fleet));

    // No session: the page says how to sign in and shows nothing of the fleet.
    for path in ["/", "/agents", "/rollouts", "/audit"] {
        browser.client.goto(&format!("{base}{path}")).await.unwrap();
        let text = browser.text().await.unwrap();
        assert!(text.contains("stagehand ui"), "{path}: {text}");
        assert!(!text.contains("p1") && !text.contains("prod"), "{path} shows the fleet without a session: {text}");
    }

    let link = login_link(&fleet, &fleet.admin);
    open_link(&browser, &link).await;
    let text = browser
        .wait_text("the fleet page", Duration::from_secs(20), |t| t.contains("agents connected") && t.contains("s1"))
        .await
        .unwrap();
    // Every agent by name, each with the live version of each app (or none).
    let chips = browser
        .eval("return Array.from(document.querySelectorAll('.chip.agent')).map(a => a.innerText.replace(/\\s+/g, ' ').trim())")
        .await
        .unwrap();
    let chips: Vec<String> = serde_json::from_value(chips).unwrap();
    // Environments in promotion order (prod), then the others (lab).
    assert_eq!(chips, ["p1 web v1", "p2 web v1", "s1 web —"], "{text}");
    assert!(text.contains("admin · owner"), "{text}");
    // The cookie is the session's only carrier, and scripts cannot read it.
    let cookies = browser.client.get_all_cookies().await.unwrap();
    let cookie = cookies.iter().find(|c| c.name().starts_with("stagehand-")).expect("a session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    let js_sees = browser.eval("return document.cookie").await.unwrap();
    assert_eq!(js_sees, "", "HttpOnly: the page's scripts cannot read the session");

    // The agents page lists them too, with their versions.
    browser.client.goto(&format!("{base}/agents?env=prod")).await.unwrap();
    let text = browser.wait_text("the agents page", Duration::from_secs(10), |t| t.contains("p2")).await.unwrap();
    assert!(text.contains("p1") && !text.contains("s1"), "{text}");
    browser.client.goto(&format!("{base}/audit")).await.unwrap();
    let text =
        browser.wait_text("the audit page", Duration::from_secs(10), |t| t.contains("ui-session")).await.unwrap();
    assert!(text.contains("ui-login"), "{text}");
    browser.screenshot("audit").await.unwrap();

    // Signed out, the same link does not sign in again: it worked once.
    browser.client.delete_all_cookies().await.unwrap();
    open_link(&browser, &link).await;
    let text = browser
        .wait_text("the used link to be refused", Duration::from_secs(10), |t| t.contains("used already"))
        .await
        .unwrap();
    assert!(!text.contains("p1"), "{text}");
    browser.client.goto(&format!("{base}/")).await.unwrap();
    let text = browser.text().await.unwrap();
    assert!(text.contains("stagehand ui") && !text.contains("p1"), "{text}");
    browser.close().await;
}

/// The states of a rollout page's waves, as the browser shows them.
async fn wave_states(browser: &Browser) -> Vec<String> {
    let v = browser
        .eval("return Array.from(document.querySelectorAll('li.wave')).map(w => w.dataset.state)")
        .await
        .unwrap_or_default();
    serde_json::from_value(v).unwrap_or_default()
}

async fn wait_waves(browser: &Browser, what: &str, ok: impl Fn(&[String]) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waves = wave_states(browser).await;
        if ok(&waves) {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; waves: {waves:?}; page: {}",
                browser.text().await.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_a_rollout_by_itself_and_its_pause_button_pauses_it() {
    let fleet = Fleet::start_http().await.unwrap();
    let _prod = agents(&fleet, "prod", &["p1", "p2", "p3"]).await;
    stage(&fleet, &["prod"], &["v1", "v2"]).await;
    assert!(fleet.release("web", "v1", "prod").await.unwrap().all_done());
    let Some(browser) = Browser::start(fleet.path()).await.unwrap() else { return };
    let base = format!("http://{}", http_of(&fleet));
    open_link(&browser, &login_link(&fleet, &fleet.admin)).await;
    browser.wait_text("the fleet page", Duration::from_secs(20), |t| t.contains("agents connected")).await.unwrap();

    let spec = RolloutSpec {
        app: "web".into(),
        version: Some("v2".into()),
        env: "prod".into(),
        waves: Some("1,2,3".into()),
        bake_secs: Some(2),
        ..Default::default()
    };
    let r = fleet.rollout(spec).await.unwrap();
    // The overview shows the rollout in flight without being reloaded.
    browser.eval("window.stayed = 42; return 0").await.unwrap();
    browser
        .wait_text("the overview to show the rollout", Duration::from_secs(20), |t| t.contains(&r.id))
        .await
        .unwrap();
    browser.screenshot("fleet").await.unwrap();
    assert_eq!(browser.eval("return window.stayed").await.unwrap(), 42, "the page was reloaded");

    browser.client.goto(&format!("{base}/rollouts/{}", r.id)).await.unwrap();
    browser.eval("window.stayed = 42; return 0").await.unwrap();
    wait_waves(&browser, "wave 1 to pass on the page", |w| w.first().is_some_and(|s| s == "passed")).await;
    assert_eq!(browser.eval("return window.stayed").await.unwrap(), 42, "the page was reloaded");
    browser.screenshot("rollout").await.unwrap();

    // Pause: the rollout holds after the wave in flight.
    browser.client.find(Locator::Css("button[data-action=pause]")).await.unwrap().click().await.unwrap();
    fleet
        .wait_rollout_until(&r.id, "the rollout to pause", Duration::from_secs(60), |r| r.state == "paused")
        .await
        .unwrap();
    browser
        .wait_text("the page to say paused", Duration::from_secs(20), |t| t.contains("paused") && t.contains("Resume"))
        .await
        .unwrap();
    let held = fleet.rollout_status(&r.id).await.unwrap();
    assert_ne!(held.waves.last().unwrap().state, "passed", "{held:#?}");

    // A viewer sees the rollout, gets no buttons, and a forged one is refused and recorded.
    let viewer = identity(&fleet, "watcher", "viewer");
    browser.client.delete_all_cookies().await.unwrap();
    open_link(&browser, &login_link(&fleet, &viewer)).await;
    browser.wait_text("the viewer's page", Duration::from_secs(20), |t| t.contains("watcher · viewer")).await.unwrap();
    browser.client.goto(&format!("{base}/rollouts/{}", r.id)).await.unwrap();
    browser.wait_text("the rollout as a viewer", Duration::from_secs(10), |t| t.contains("paused")).await.unwrap();
    assert!(browser.client.find_all(Locator::Css("button[data-action]")).await.unwrap().is_empty());
    let forged = format!(
        "const csrf = document.querySelector('input[name=csrf]').value; \
         return fetch('/rollouts/{}/resume', {{method: 'POST', body: new URLSearchParams({{csrf}})}}).then(r => r.text())",
        r.id
    );
    // The form's redirect, followed: the rollout's page says what happened.
    let said = browser.eval(&forged).await.unwrap();
    let said = said.as_str().unwrap_or_default();
    assert!(said.contains("Refused: watcher (role viewer) may not release in prod"), "{said}");
    assert_eq!(fleet.rollout_status(&r.id).await.unwrap().state, "paused");

    // The owner resumes it from the page; the page follows it to the end by itself.
    browser.client.delete_all_cookies().await.unwrap();
    open_link(&browser, &login_link(&fleet, &fleet.admin)).await;
    browser.wait_text("the owner's page", Duration::from_secs(20), |t| t.contains("admin · owner")).await.unwrap();
    browser.client.goto(&format!("{base}/rollouts/{}", r.id)).await.unwrap();
    browser.eval("window.before = 1; return 0").await.unwrap();
    browser.client.find(Locator::Css("button[data-action=resume]")).await.unwrap().click().await.unwrap();
    // The page the button's redirect loads (the old document had the mark), then the marker.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while browser.eval("return window.before === 1 || document.readyState !== 'complete'").await.unwrap_or_default()
        != false
    {
        assert!(std::time::Instant::now() < deadline, "the button did not load the rollout's page");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser.eval("window.stayed = 42; return 0").await.unwrap();
    wait_waves(&browser, "every wave to pass on the page", |w| w.len() == 3 && w.iter().all(|s| s == "passed")).await;
    browser.wait_text("succeeded", Duration::from_secs(20), |t| t.contains("succeeded")).await.unwrap();
    assert_eq!(browser.eval("return window.stayed").await.unwrap(), 42, "the page was reloaded");
    assert_eq!(fleet.wait_rollout(&r.id).await.unwrap().state, "succeeded");

    let audit = stagehand_controller::audit::read(&stagehand_controller::audit::path(&fleet.ctl_dir)).unwrap();
    let by = |who: &str, what: &str| audit.iter().filter(|e| e.who == who && e.what == what).count();
    assert_eq!(by("admin", "control-rollout"), 2, "pause and resume, recorded as the owner");
    let refused = audit.iter().find(|e| e.who == "watcher" && e.what == "control-rollout").expect("recorded");
    assert!(refused.outcome.starts_with("refused"), "{refused:?}");
    browser.close().await;
}

/// The session cookie a login response sets.
fn session_cookie(head: &str) -> String {
    let line = head.lines().find(|l| l.starts_with("set-cookie: stagehand-")).expect("a session cookie");
    let value = line.trim_start_matches("set-cookie: ").split(';').next().unwrap().to_string();
    assert!(line.contains("httponly") && line.contains("samesite=strict"), "{line}");
    value
}

fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + "name=\"csrf\" value=\"".len();
    html[at..at + 64].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_work_once_forms_need_the_page_and_a_revoked_identity_is_out_at_once() {
    // Without --http there is no page, and `stagehand ui` says how to serve one.
    let plain = Fleet::start().await.unwrap();
    let out = run_cli(STAGEHAND, Some(&plain), &["ui"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("serves no fleet page") && err.contains("--http ADDR"), "{err}");
    drop(plain);

    let fleet = Fleet::start_http().await.unwrap();
    let _p = agents(&fleet, "prod", &["p1", "p2"]).await;
    stage(&fleet, &["prod"], &["v1", "v2"]).await;
    assert!(fleet.release("web", "v1", "prod").await.unwrap().all_done());
    let http = http_of(&fleet);
    let origin = format!("http://{http}");
    let ops = identity(&fleet, "ops", "releaser");
    let link = login_link(&fleet, &ops);
    let secret = link.rsplit_once('#').unwrap().1.to_string();
    let form = format!("secret={secret}");

    // Nothing of the fleet without a session.
    for path in ["/", "/agents", "/rollouts", "/audit", "/events"] {
        let (status, _, body) = http_request(http, "GET", path, &[], "").await.unwrap();
        assert_eq!(status, 401, "{path}");
        assert!(!body.contains("p1"), "{path}: {body}");
    }
    // A login posted from another origin is refused, and does not spend the link.
    let (status, _, _) =
        http_request(http, "POST", "/login", &[("Origin", "http://evil.example")], &form).await.unwrap();
    assert_eq!(status, 403);
    let (status, head, _) = http_request(http, "POST", "/login", &[("Origin", &origin)], &form).await.unwrap();
    assert_eq!(status, 303, "{head}");
    let cookie = session_cookie(&head);
    // Once.
    let (status, _, _) = http_request(http, "POST", "/login", &[("Origin", &origin)], &form).await.unwrap();
    assert_eq!(status, 401);

    let with = [("Cookie", cookie.as_str())];
    let (status, _, page) = http_request(http, "GET", "/", &with, "").await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("p1") && page.contains("ops · releaser"), "{page}");
    let csrf = csrf_of(&page);

    let r = fleet
        .rollout(RolloutSpec {
            app: "web".into(),
            version: Some("v2".into()),
            env: "prod".into(),
            waves: Some("1,2".into()),
            bake_secs: Some(600),
            ..Default::default()
        })
        .await
        .unwrap();
    let pause = format!("/rollouts/{}/pause", r.id);
    // Without the session's CSRF token, or from another origin, a button does nothing.
    let wrong = format!("csrf={}", "0".repeat(64));
    let (status, _, _) = http_request(http, "POST", &pause, &with, &wrong).await.unwrap();
    assert_eq!(status, 403);
    let good = format!("csrf={csrf}");
    let cross = [("Cookie", cookie.as_str()), ("Origin", "http://evil.example")];
    let (status, _, _) = http_request(http, "POST", &pause, &cross, &good).await.unwrap();
    assert_eq!(status, 403);
    let cross = [("Cookie", cookie.as_str()), ("Sec-Fetch-Site", "cross-site")];
    let (status, _, _) = http_request(http, "POST", &pause, &cross, &good).await.unwrap();
    assert_eq!(status, 403);
    assert!(!fleet.rollout_status(&r.id).await.unwrap().pause_requested);
    // With both, it does what `rollout pause` does.
    let (status, head, _) = http_request(http, "POST", &pause, &with, &good).await.unwrap();
    assert_eq!(status, 303, "{head}");
    let paused = fleet.rollout_status(&r.id).await.unwrap();
    assert!(paused.pause_requested || paused.state == "paused", "{paused:#?}");

    // A releaser of staging may not steer a prod rollout, even with a good form.
    let staging_only = identity_in(&fleet, "stg", "releaser", Some("staging"));
    let stg = sign_in(&fleet, &staging_only).await;
    let stg_with = [("Cookie", stg.as_str())];
    let (_, _, stg_page) = http_request(http, "GET", "/", &stg_with, "").await.unwrap();
    assert!(!stg_page.contains("data-action="), "no buttons for a rollout it may not steer");
    let resume = format!("/rollouts/{}/resume", r.id);
    let stg_form = format!("csrf={}", csrf_of(&stg_page));
    let (status, _, _) = http_request(http, "POST", &resume, &stg_with, &stg_form).await.unwrap();
    assert_eq!(status, 303);
    let (_, _, said) = http_request(http, "GET", &format!("/rollouts/{}", r.id), &stg_with, "").await.unwrap();
    assert!(said.contains("Refused: stg (role releaser in staging) may not release in prod"), "{said}");
    let still = fleet.rollout_status(&r.id).await.unwrap();
    assert!(still.pause_requested || still.state == "paused", "{still:#?}");

    // The live part of a page needs a session like the rest.
    let (status, _, body) = http_request(http, "GET", "/", &[("X-Stagehand-Live", "1")], "").await.unwrap();
    assert_eq!(status, 401);
    assert!(!body.contains("p1"));

    // The event stream opens for the session, and stays open…
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut events = tokio::net::TcpStream::connect(http).await.unwrap();
    let req = format!("GET /events HTTP/1.1\r\nHost: {http}\r\nCookie: {cookie}\r\n\r\n");
    events.write_all(req.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), events.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the stream closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200") && head.contains("text/event-stream"), "{head}");

    // …until the identity is revoked: the stream says so and ends; every request is refused.
    let resp = fleet.call(AdminRequest::RevokeAdmin { name: "ops".into() }).await.unwrap();
    assert!(matches!(resp, AdminResponse::AdminRevoked { .. }), "{resp:?}");
    while !String::from_utf8_lossy(&seen).contains("event: signed-out") {
        let n = tokio::time::timeout(Duration::from_secs(10), events.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended without saying why: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let (status, _, body) = http_request(http, "GET", "/", &with, "").await.unwrap();
    assert_eq!(status, 401);
    assert!(!body.contains("p1"));
    let (status, _, _) = http_request(http, "POST", &pause, &with, &good).await.unwrap();
    assert_eq!(status, 401);

    // Sign-out ends a session.
    let link = login_link(&fleet, &fleet.admin);
    let form = format!("secret={}", link.rsplit_once('#').unwrap().1);
    let (_, head, _) = http_request(http, "POST", "/login", &[], &form).await.unwrap();
    let cookie = session_cookie(&head);
    let with = [("Cookie", cookie.as_str())];
    let (_, _, page) = http_request(http, "GET", "/", &with, "").await.unwrap();
    let (status, _, _) =
        http_request(http, "POST", "/logout", &with, &format!("csrf={}", csrf_of(&page))).await.unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = http_request(http, "GET", "/", &with, "").await.unwrap();
    assert_eq!(status, 401);
}

/// Signs in over plain HTTP as the identity whose credentials are in `creds`: the cookie.
async fn sign_in(fleet: &Fleet, creds: &Path) -> String {
    let link = login_link(fleet, creds);
    let form = format!("secret={}", link.rsplit_once('#').unwrap().1);
    let (status, head, _) = http_request(http_of(fleet), "POST", "/login", &[], &form).await.unwrap();
    assert_eq!(status, 303, "{head}");
    session_cookie(&head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_stays_readable_with_a_thousand_agents() {
    let fleet = Fleet::start_http().await.unwrap();
    // Registry records written straight into the store: what is tested is how the page
    // counts, groups and pages them, not enrolment.
    let store = &fleet.controller.as_ref().unwrap().controller.store;
    for i in 0..1000u32 {
        store
            .put_agent(&stagehand_controller::store::AgentRecord {
                v: 2,
                id: stagehand_common::AgentId(format!("a-{i:016x}")),
                name: format!("host-{i:04}"),
                env: if i % 4 == 0 { "staging".into() } else { "prod".into() },
                labels: Default::default(),
                cert_fingerprint: format!("{i:064x}"),
                revoked: false,
                joined_at: 0,
                own_labels: Default::default(),
            })
            .unwrap();
    }
    let cookie = sign_in(&fleet, &fleet.admin).await;
    let with = [("Cookie", cookie.as_str())];
    let http = http_of(&fleet);

    let (status, _, page) = http_request(http, "GET", "/", &with, "").await.unwrap();
    assert_eq!(status, 200);
    assert!(page.len() < 64 << 10, "the overview is {} bytes for 1,000 agents", page.len());
    assert!(page.contains("0 of 750 agents connected") && page.contains("0 of 250 agents connected"), "{page}");
    assert_eq!(page.matches("class=\"chip agent").count(), 48, "24 named per environment");
    assert!(page.contains("all 750 agents →") && page.contains("all 250 agents →"), "{page}");

    let (_, _, list) = http_request(http, "GET", "/agents?env=prod", &with, "").await.unwrap();
    assert_eq!(list.matches("<tr data-agent=").count(), 100);
    assert!(list.contains("page 1 of 8") && list.contains("750 shown"), "{list}");
    let (_, _, last) = http_request(http, "GET", "/agents?env=prod&page=8", &with, "").await.unwrap();
    assert_eq!(last.matches("<tr data-agent=").count(), 50);
    assert!(last.contains("host-0999") && !last.contains("host-0001<"), "{last}");
    let (_, _, found) = http_request(http, "GET", "/agents?q=host-0421", &with, "").await.unwrap();
    assert_eq!(found.matches("<tr data-agent=").count(), 1, "{found}");
}
