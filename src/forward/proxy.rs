//! The egress proxy upstream requests go through: chosen by `--upstream-proxy`, else by the
//! standard variables (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`) as curl reads
//! them, with the credentials in its URL kept out of every log and answer.

use hyper::header::HeaderValue;
use hyper::Uri;
use hyper_util::client::proxy::matcher::Matcher;

/// Which proxy the upstream setting asks for.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum ProxySetting {
    /// The standard variables decide (the default).
    #[default]
    Environment,
    /// No proxy, whatever the variables say (`--upstream-proxy none`).
    None,
    /// This proxy for the upstream, whatever the variables say. May hold a password.
    Url(String),
}

impl std::fmt::Debug for ProxySetting {
    /// Without the URL, which may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxySetting::Environment => f.write_str("Environment"),
            ProxySetting::None => f.write_str("None"),
            ProxySetting::Url(_) => f.write_str("Url(..)"),
        }
    }
}

impl ProxySetting {
    /// `none`, or an `http://[user:password@]host:port` URL.
    pub fn parse(text: &str) -> Result<ProxySetting, String> {
        if text.trim().eq_ignore_ascii_case("none") {
            return Ok(ProxySetting::None);
        }
        let setting = ProxySetting::Url(text.trim().to_owned());
        // Checked against any https destination: the URL alone decides.
        setting.resolve(&Uri::from_static("https://upstream.invalid"))?;
        Ok(setting)
    }

    /// The proxy requests to `upstream` go through, if any. `Err` names the variable or
    /// setting whose proxy cannot be used (never with its credentials).
    pub fn resolve(&self, upstream: &Uri) -> Result<Option<Proxy>, String> {
        let matcher = match self {
            ProxySetting::None => return Ok(None),
            ProxySetting::Url(url) => Matcher::builder().all(url.as_str()).build(),
            ProxySetting::Environment => match environment_matcher() {
                Some(matcher) => matcher,
                None => return Ok(None),
            },
        };
        let Some(intercept) = matcher.intercept(upstream) else {
            return match self {
                ProxySetting::Url(_) => {
                    Err("not a proxy URL like http://host:port (or none)".into())
                }
                _ => Ok(None),
            };
        };
        let uri = intercept.uri().clone();
        if uri.scheme_str() != Some("http") {
            let scheme = uri.scheme_str().unwrap_or("?");
            return Err(match self {
                ProxySetting::Environment => format!(
                    "the proxy variables name a {scheme}:// proxy, and only http:// proxies are supported: set --upstream-proxy"
                ),
                _ => format!("only http:// proxies are supported, not {scheme}://"),
            });
        }
        Ok(Some(Proxy {
            uri,
            authorization: intercept.basic_auth().cloned().map(|mut value| {
                value.set_sensitive(true);
                value
            }),
        }))
    }
}

/// A proxy in use: where it is, and the `Proxy-Authorization` its URL's credentials make.
#[derive(Clone)]
pub struct Proxy {
    /// `http://host:port/`, without credentials.
    pub uri: Uri,
    pub authorization: Option<HeaderValue>,
}

impl Proxy {
    /// `http://host:port`: what logs and `grouprelay status` show; never the credentials.
    pub fn shown(&self) -> String {
        let authority = self.uri.authority().map_or("?", |a| a.as_str());
        format!("http://{authority}")
    }
}

/// The standard variables, lower case first where both are set (as curl reads them);
/// `None` when `NO_PROXY` is `*`, which bypasses the proxy for every host (hyper-util's
/// matcher applies `*` to names only, not to IP addresses).
fn environment_matcher() -> Option<Matcher> {
    let var = |name: &str| {
        [name.to_ascii_lowercase(), name.to_owned()]
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
            .unwrap_or_default()
    };
    let no_proxy = var("NO_PROXY");
    if no_proxy.split(',').any(|entry| entry.trim() == "*") {
        return None;
    }
    Some(
        Matcher::builder()
            .all(var("ALL_PROXY"))
            .http(var("HTTP_PROXY"))
            .https(var("HTTPS_PROXY"))
            .no(no_proxy)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_url_is_parsed_and_shown_without_its_password() {
        let setting = ProxySetting::parse("http://alice:s3cret@proxy.example:3128").unwrap();
        assert_eq!(format!("{setting:?}"), "Url(..)");
        let upstream = Uri::from_static("https://api.segment.io");
        let proxy = setting.resolve(&upstream).unwrap().unwrap();
        assert_eq!(proxy.shown(), "http://proxy.example:3128");
        assert_eq!(
            proxy.authorization.unwrap(),
            "Basic YWxpY2U6czNjcmV0" // alice:s3cret
        );
    }

    #[test]
    fn none_and_bad_urls() {
        assert!(ProxySetting::parse("none").unwrap() == ProxySetting::None);
        assert!(ProxySetting::parse("socks5://proxy:1080").is_err());
        assert!(ProxySetting::parse("https://proxy:3128").is_err());
        assert!(ProxySetting::parse("::nonsense").is_err());
    }
}
