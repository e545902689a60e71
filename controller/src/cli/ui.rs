//! `stagehand ui`: a one-time link that signs a browser in to the fleet page.

use super::Ctx;
use anyhow::{bail, Result};
use stagehand_common::protocol::{AdminRequest, AdminResponse};

pub async fn run(ctx: &Ctx) -> Result<i32> {
    let client = ctx.client().await?;
    let resp = client.call(&AdminRequest::UiLogin).await;
    client.close().await;
    let AdminResponse::UiLogin { secret, expires_at, base_url } = resp? else {
        bail!("the controller does not know `stagehand ui`: upgrade it")
    };
    let Some(base) = base_url else { bail!("the controller serves no fleet page: serve it with --http ADDR") };
    let url = link(&base, ctx.controller.as_deref().unwrap_or_default(), &secret);
    if ctx.json() {
        super::print_json(&serde_json::json!({ "url": url, "expires_at": expires_at }));
    } else {
        outln!("{url}");
        eprintln!(
            "Open it within {} to sign in to the fleet page; it works once.",
            humantime::format_duration(crate::web::LOGIN_TTL)
        );
    }
    Ok(0)
}

/// The login link: the page's base URL, where an address bound to every interface
/// (`0.0.0.0`, `[::]`) becomes the host the CLI reached the controller at; the secret goes
/// in the fragment, which browsers never send to a server.
pub fn link(base: &str, controller: &str, secret: &str) -> String {
    let host = controller.rsplit_once(':').map_or(controller, |(h, _)| h);
    let base = if host.is_empty() {
        base.to_string()
    } else {
        base.replacen("://0.0.0.0:", &format!("://{host}:"), 1).replacen("://[::]:", &format!("://{host}:"), 1)
    };
    format!("{base}/login#{secret}")
}

#[cfg(test)]
mod tests {
    use super::link;

    #[test]
    fn an_unspecified_address_becomes_the_controllers_host() {
        assert_eq!(link("http://0.0.0.0:9100", "ctl.example:7443", "s"), "http://ctl.example:9100/login#s");
        assert_eq!(link("http://[::]:9100", "[fd00::1]:7443", "s"), "http://[fd00::1]:9100/login#s");
        assert_eq!(link("http://127.0.0.1:9100", "ctl:7443", "s"), "http://127.0.0.1:9100/login#s");
        assert_eq!(link("https://stagehand.example", "ctl:7443", "s"), "https://stagehand.example/login#s");
    }
}
