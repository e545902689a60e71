//! Enrolment: good, used, expired, unknown and foreign tokens; roles per channel.

use stagehand_common::protocol::{AdminRequest, AdminResponse};
use stagehand_common::token::JoinToken;
use stagehand_tests::{wait_for, Fleet};
use std::time::Duration;

#[tokio::test]
async fn a_good_token_enrols_once_and_only_once() {
    let fleet = Fleet::start().await.unwrap();
    let token = fleet.token("prod", 600).await.unwrap();
    let addr = fleet.addr.to_string();
    let dir = fleet.path().join("a1");
    let id = stagehand_agent::join::join(&addr, &token, &dir, Some("web-1".into()), Default::default()).await.unwrap();
    assert_eq!(id.env, "prod");
    assert!(id.id.0.starts_with("a-"));
    assert!(dir.join("identity/key.pem").exists() && dir.join("agent.toml").exists());

    // The same token again: refused, nothing written.
    let dir2 = fleet.path().join("a2");
    let err = stagehand_agent::join::join(&addr, &token, &dir2, None, Default::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("already used"), "{err:#}");
    assert!(!dir2.join("identity/agent.json").exists());

    let AdminResponse::Agents { agents } = fleet.call(AdminRequest::ListAgents).await.unwrap() else { panic!() };
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].name, "web-1");
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let fleet = Fleet::start().await.unwrap();
    let AdminResponse::Token { token, expires_at } = fleet
        .call(AdminRequest::CreateToken { env: "dev".into(), ttl_secs: 1, labels: Default::default(), uses: 1 })
        .await
        .unwrap()
    else {
        panic!()
    };
    wait_for("the token to expire", Duration::from_secs(5), || async {
        stagehand_common::ids::now_secs() >= expires_at
    })
    .await
    .unwrap();
    let err =
        stagehand_agent::join::join(&fleet.addr.to_string(), &token, &fleet.path().join("a"), None, Default::default())
            .await
            .unwrap_err();
    assert!(format!("{err:#}").contains("expired"), "{err:#}");
}

#[tokio::test]
async fn unknown_and_foreign_tokens_are_refused() {
    let fleet = Fleet::start().await.unwrap();
    let other = Fleet::start().await.unwrap();
    let addr = fleet.addr.to_string();

    // Right CA, made-up secret.
    let real = JoinToken::parse(&fleet.token("dev", 600).await.unwrap()).unwrap();
    let forged = JoinToken { secret: "0".repeat(32), ..real.clone() };
    let err =
        stagehand_agent::join::join(&addr, &forged.to_string(), &fleet.path().join("x"), None, Default::default())
            .await
            .unwrap_err();
    assert!(format!("{err:#}").contains("unknown"), "{err:#}");

    // A token from another controller: its CA fingerprint does not match this controller.
    let foreign = other.token("dev", 600).await.unwrap();
    let err = stagehand_agent::join::join(&addr, &foreign, &fleet.path().join("y"), None, Default::default())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("cannot enrol"), "{err:#}");
    assert!(!fleet.path().join("y/identity/agent.json").exists());

    // The forged attempt did not burn the real token.
    stagehand_agent::join::join(&addr, &real.to_string(), &fleet.path().join("z"), None, Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn certificates_only_open_their_own_channels() {
    use stagehand_common::protocol::{ALPN_ADMIN, ALPN_DEPLOY};
    use stagehand_common::tls::Credentials;
    let fleet = Fleet::start().await.unwrap();
    let agent = fleet.enrol("dev", "a").await.unwrap();
    let agent_creds = Credentials::load(&agent.dir.join("identity")).unwrap();
    let admin_creds = Credentials::load(&fleet.admin).unwrap();

    // An agent certificate on the admin channel is refused.
    let err =
        stagehand_controller::client::Client::connect(Some(&fleet.addr.to_string()), Some(&agent.dir.join("identity")))
            .await
            .err()
            .expect("an agent certificate must not open the admin channel");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");

    // An admin certificate on the deploy channel is closed before any message is served.
    let ep = stagehand_common::net::client_endpoint(fleet.addr).unwrap();
    let cfg = stagehand_common::net::client_config(admin_creds.client_config(ALPN_DEPLOY).unwrap()).unwrap();
    let conn = stagehand_common::net::connect(&ep, fleet.addr, cfg).await.unwrap();
    let reason = conn.closed().await;
    assert!(format!("{reason}").contains("not allowed"), "{reason}");

    // The agent's own certificate on the deploy channel works.
    let cfg = stagehand_common::net::client_config(agent_creds.client_config(ALPN_DEPLOY).unwrap()).unwrap();
    let conn = stagehand_common::net::connect(&ep, fleet.addr, cfg).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    stagehand_common::frame::write_msg(
        &mut send,
        &stagehand_common::protocol::DeployUp::Hello { protocol_version: stagehand_common::protocol::PROTOCOL_VERSION },
    )
    .await
    .unwrap();
    let hello: Option<stagehand_common::protocol::DeployDown> =
        stagehand_common::frame::read_msg::<_, _, 1024>(&mut recv).await.unwrap();
    assert!(matches!(hello, Some(stagehand_common::protocol::DeployDown::Hello { .. })));
    let _ = ALPN_ADMIN;
}

/// Hardening (#9, finding 9): the token carried only the CA fingerprint, so whoever held the
/// controller at join time could have new agents pin a release key of their own. Now the
/// token names the release key, and an agent refuses any other.
#[tokio::test]
async fn an_agent_pins_only_the_release_key_its_token_vouches_for() {
    let mut fleet = Fleet::start().await.unwrap();
    let token = fleet.token("dev", 600).await.unwrap();
    // Someone with the controller host swaps its release key for their own.
    let theirs = fleet.path().join("theirs");
    stagehand_controller::init::init(&theirs, "127.0.0.1:0".parse().unwrap()).unwrap();
    std::fs::copy(theirs.join("release/release.key"), fleet.ctl_dir.join("release/release.key")).unwrap();
    fleet.restart_controller().await.unwrap();
    let dir = fleet.path().join("a");
    let err =
        stagehand_agent::join::join(&fleet.addr.to_string(), &token, &dir, None, Default::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains("release key the token does not vouch for"), "{err:#}");
    assert!(!dir.join("identity/agent.json").exists(), "nothing was pinned");
    // A token made now names the key the controller has now.
    let token = fleet.token("dev", 600).await.unwrap();
    stagehand_agent::join::join(&fleet.addr.to_string(), &token, &dir, None, Default::default()).await.unwrap();
}

/// Hardening (#9, finding 5): every certificate was valid from 1975 to 4096. Now an agent's
/// certificate lives 30 days by default, and the agent renews it over its own channel two
/// thirds in, without an operator: shown with a controller whose agent certificates live
/// twelve seconds, by connecting anew after the first certificate has expired.
#[tokio::test]
async fn agent_certificates_expire_and_are_renewed_without_an_operator() {
    use stagehand_common::tls;
    let mut fleet = Fleet::start().await.unwrap();
    let cert = |a: &stagehand_tests::TestAgent| std::fs::read_to_string(a.dir.join("identity/cert.pem")).unwrap();
    let now = || stagehand_common::ids::now_secs() as i64;
    let default = fleet.enrol("lab", "default").await.unwrap();
    let (_, until) = tls::validity(&cert(&default)).unwrap();
    assert!(until - now() <= 30 * 86400 + 5 && until - now() > 29 * 86400, "{until}");

    let config = fleet.ctl_dir.join("controller.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("agent_cert_lifetime = \"30days\""), "init writes the default:\n{text}");
    std::fs::write(&config, text.replace("agent_cert_lifetime = \"30days\"", "agent_cert_lifetime = \"12s\"")).unwrap();
    fleet.restart_controller().await.unwrap();
    let mut agent = fleet.agent("prod", "short").await.unwrap();
    let first = cert(&agent);
    let (_, first_until) = tls::validity(&first).unwrap();
    assert!(first_until - now() <= 13, "a 12-second certificate");
    wait_for("the agent to renew its certificate", Duration::from_secs(30), || async { cert(&agent) != first })
        .await
        .unwrap();
    assert!(tls::validity(&cert(&agent)).unwrap().1 > first_until);

    // After the first certificate's end, new connections (a restarted agent) still work.
    wait_for("the first certificate to expire", Duration::from_secs(30), || async { now() > first_until + 1 })
        .await
        .unwrap();
    agent.stop().await;
    agent.start().await.unwrap();
    let src = fleet.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    fleet.push("web", "1", &src).await.unwrap();
    let p = fleet.deploy("web", "1", "prod", 30).await.unwrap();
    assert!(p.done.contains(&agent.id), "{p:?}");
}
