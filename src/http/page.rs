//! The HTML status page: one row per mailbox and protocol, failures first, each with its
//! reason, the fix, the server's words and a link to the redacted transcript. Plain HTML
//! and CSS, no script: it works in any browser and behind any proxy.

use crate::status::{RowStatus, Snapshot, rfc3339};
use std::fmt::Write;
use std::time::{Duration, SystemTime};

/// Escapes text for HTML element content and attribute values. Everything shown here
/// that a server or config wrote goes through it.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ago(now: SystemTime, t: SystemTime) -> String {
    let d = now.duration_since(t).unwrap_or_default().as_secs();
    match d {
        0..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86_399 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86_400),
    }
}

fn until(now: SystemTime, t: SystemTime) -> (String, &'static str) {
    match t.duration_since(now) {
        Err(_) => ("expired".into(), "bad"),
        Ok(d) => {
            let days = d.as_secs() / 86_400;
            let class = if days < 2 {
                "bad"
            } else if days < 14 {
                "warn"
            } else {
                ""
            };
            let text = if d < Duration::from_secs(3600) {
                format!("in {} min", d.as_secs() / 60)
            } else if days < 2 {
                format!("in {} h", d.as_secs() / 3600)
            } else {
                format!("in {days} days")
            };
            (text, class)
        }
    }
}

fn time_cell(now: SystemTime, t: Option<SystemTime>) -> String {
    match t {
        None => "<td class=\"muted\">never</td>".into(),
        Some(t) => format!(
            "<td title=\"{}\">{}</td>",
            escape(&rfc3339(t)),
            escape(&ago(now, t))
        ),
    }
}

fn expiry_cell(now: SystemTime, t: Option<SystemTime>) -> String {
    match t {
        None => "<td class=\"muted\">-</td>".into(),
        Some(t) => {
            let (text, class) = until(now, t);
            let class = class_attr(class);
            format!(
                "<td{class} title=\"{}\">{}</td>",
                escape(&rfc3339(t)),
                escape(&text)
            )
        }
    }
}

fn class_attr(class: &str) -> String {
    if class.is_empty() {
        String::new()
    } else {
        format!(" class=\"{class}\"")
    }
}

/// An access token's expiry: a token close to the end of its normal lifetime (an hour at
/// Microsoft and Google) is fine, the next probe renews it; only one past its expiry, which
/// means no probe renewed it, is marked.
fn access_token_cell(now: SystemTime, t: Option<SystemTime>) -> String {
    match t {
        None => "<td class=\"muted\">-</td>".into(),
        Some(t) => {
            let (text, class) = match t.duration_since(now) {
                Err(_) => ("expired".to_string(), "warn"),
                Ok(d) if d < Duration::from_secs(3600) => {
                    (format!("in {} min", d.as_secs() / 60), "")
                }
                Ok(d) => (format!("in {} h", d.as_secs() / 3600), ""),
            };
            format!(
                "<td{} title=\"{}\">{}</td>",
                class_attr(class),
                escape(&rfc3339(t)),
                escape(&text)
            )
        }
    }
}

const STYLE: &str = r#"
:root { --ok:#1a7f37; --bad:#cf222e; --warn:#9a6700; --muted:#6e7781; --line:#d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1f2328; background: #f6f8fa; }
header { background: #24292f; color: #fff; padding: 14px 24px; display: flex; gap: 24px; align-items: baseline; flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; font-weight: 600; }
header .meta { color: #afb8c1; font-size: 12px; }
header a { color: #9ecbff; }
main { padding: 16px 24px 40px; }
.summary { display: flex; gap: 12px; margin: 0 0 16px; flex-wrap: wrap; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 16px; min-width: 120px; }
.card b { display: block; font-size: 22px; }
.card.ok b { color: var(--ok); } .card.bad b { color: var(--bad); } .card.pending b { color: var(--muted); }
.banner { background: #fff1f0; border: 1px solid #ffcecb; color: var(--bad); padding: 10px 14px; border-radius: 8px; margin-bottom: 16px; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); border-radius: 8px; overflow: hidden; margin-bottom: 24px; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: #57606a; }
tr:last-child td { border-bottom: 0; }
.badge { display: inline-block; border-radius: 12px; padding: 1px 9px; font-size: 12px; font-weight: 600; color: #fff; }
.badge.ok { background: var(--ok); } .badge.failed { background: var(--bad); } .badge.pending { background: var(--muted); }
.reason { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-weight: 600; }
.hint { color: var(--warn); }
.detail { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; color: #57606a; word-break: break-word; max-width: 46em; }
.muted { color: var(--muted); } .bad { color: var(--bad); font-weight: 600; } .warn { color: var(--warn); font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
h2 { font-size: 15px; margin: 8px 0; }
.reasons { display: flex; gap: 6px; flex-wrap: wrap; margin: -6px 0 16px; }
.reasons span { background: #fff; border: 1px solid var(--line); border-radius: 12px; padding: 1px 9px; font-size: 12px; }
.reasons span.permanent { border-color: #ffcecb; color: var(--bad); } .reasons span.transient { border-color: #f5d990; color: var(--warn); }
.strip { display: flex; gap: 1px; align-items: flex-end; height: 16px; min-width: 144px; }
.tick { display: inline-block; width: 2px; height: 14px; border-radius: 1px; background: var(--ok); }
.tick.transient { background: #d4a72c; } .tick.permanent { background: var(--bad); }
.since { font-size: 12px; color: var(--bad); }
.fix code { display: inline-block; background: #f6f8fa; border: 1px solid var(--line); border-radius: 6px; padding: 2px 6px; font-size: 12px; margin: 2px 0; overflow-wrap: anywhere; user-select: all; }
"#;

/// Renders the whole page.
pub fn render(s: &Snapshot) -> String {
    let now = s.generated_at.unwrap_or_else(SystemTime::now);
    let ok = s.probes.iter().filter(|p| p.state == "ok").count();
    let failed = s.probes.iter().filter(|p| p.state == "failed").count();
    let pending = s.probes.iter().filter(|p| p.state == "pending").count();
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"15\">\
         <title>{title}mail-oauth-exporter</title><style>{STYLE}</style></head><body>\
         <header><h1>mail-oauth-exporter</h1>\
         <span class=\"meta\">version {ver} ({rev}) · config {file} · {ready} · updated {at}</span>\
         <span class=\"meta\"><a href=\"/metrics\">metrics</a> · <a href=\"/api/v1/status\">JSON</a></span></header><main>",
        title = if failed > 0 {
            format!("({failed} failing) ")
        } else {
            String::new()
        },
        ver = escape(s.version),
        rev = escape(s.revision),
        file = escape(&s.config.file),
        ready = if s.ready { "ready" } else { "not ready yet" },
        at = escape(&rfc3339(now)),
    );
    if !s.config.last_reload_successful
        && let Some(e) = &s.config.last_error
    {
        let _ = write!(
            h,
            "<div class=\"banner\" id=\"reload-error\">The last config reload was rejected; \
             the previous config keeps running.<br><code>{}</code></div>",
            escape(e)
        );
    }
    let _ = write!(
        h,
        "<div class=\"summary\">\
         <div class=\"card ok\" id=\"count-ok\"><b>{ok}</b>logging in</div>\
         <div class=\"card bad\" id=\"count-failed\"><b>{failed}</b>failing</div>\
         <div class=\"card pending\" id=\"count-pending\"><b>{pending}</b>not probed yet</div></div>"
    );
    reason_counts(&mut h, &s.probes);
    graph_section(&mut h, s);
    h.push_str(
        "<h2>Mailboxes</h2><table id=\"probes\"><thead><tr><th>mailbox</th><th>protocol</th>\
         <th>result</th><th>reason and fix</th><th>last success</th><th>last run</th>\
         <th class=\"num\">latency</th><th>last 48 probes</th><th>transcript</th></tr></thead><tbody>",
    );
    // Failures first, permanent before transient: what someone opening this page is
    // looking for. A stable sort keeps mailbox order within each group.
    let mut rows: Vec<&RowStatus> = s.probes.iter().collect();
    rows.sort_by_key(|p| p.severity());
    for p in rows {
        row(&mut h, now, p);
    }
    h.push_str("</tbody></table>");

    credentials(&mut h, now, &s.credentials);
    h.push_str("</main></body></html>\n");
    h
}

/// Microsoft Graph: open incidents first (is Microsoft down, or is the app broken?), then
/// each credential's Graph queries that fail and the warnings about its end dates.
fn graph_section(h: &mut String, s: &Snapshot) {
    let incidents: Vec<_> = s.graph.iter().flat_map(|g| g.incidents.iter()).collect();
    if !incidents.is_empty() {
        h.push_str(
            "<h2>Open Microsoft service issues</h2><table id=\"incidents\"><thead><tr><th>id</th>\
             <th>service</th><th>classification</th><th>title</th><th>last update</th></tr></thead><tbody>",
        );
        let mut seen = std::collections::HashSet::new();
        for i in incidents {
            if !seen.insert(&i.id) {
                continue; // several credentials of one tenant see the same issue
            }
            let _ = write!(
                h,
                "<tr class=\"bad\"><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&i.id),
                escape(&i.service),
                escape(&i.classification),
                escape(&i.title),
                escape(&i.last_update),
            );
        }
        h.push_str("</tbody></table>");
    }
    let problems: Vec<(String, String)> = s
        .graph
        .iter()
        .flat_map(|g| {
            g.queries
                .iter()
                .filter_map(move |q| {
                    let e = q.last_error.as_ref()?;
                    let query = q.query.map(|q| q.as_str()).unwrap_or_default();
                    Some((g.credential.clone(), format!("{query}: {e}")))
                })
                .chain(g.warnings.iter().map(|w| (g.credential.clone(), w.clone())))
        })
        .collect();
    if !problems.is_empty() {
        h.push_str(
            "<h2>Microsoft Graph</h2><table id=\"graph\"><thead><tr><th>credential</th>\
             <th>problem (probes unaffected)</th></tr></thead><tbody>",
        );
        for (c, p) in problems {
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td></tr>",
                escape(&c),
                escape(&p)
            );
        }
        h.push_str("</tbody></table>");
    }
}

fn row(h: &mut String, now: SystemTime, p: &RowStatus) {
    let reason = p.reason.map(|r| r.as_str()).unwrap_or("");
    let _ = write!(
        h,
        "<tr data-mailbox=\"{mb}\" data-protocol=\"{proto}\" data-reason=\"{reason}\" data-state=\"{state}\">\
         <td><b>{mb}</b><br><span class=\"muted\">{addr}</span></td>\
         <td>{proto}<br><span class=\"muted\">{target}</span></td>\
         <td><span class=\"badge {state}\">{label}</span></td><td>",
        mb = escape(&p.mailbox),
        addr = escape(&p.address),
        proto = p.protocol.as_str(),
        target = escape(&p.target),
        state = p.state,
        label = match p.state {
            "ok" => "OK",
            "failed" => "FAILED",
            _ => "PENDING",
        },
    );
    if p.state == "failed" {
        let _ = write!(
            h,
            "<span class=\"reason\">{reason}</span> <span class=\"muted\">({} stage, {})</span>",
            p.stage.unwrap_or(""),
            if p.transient == Some(true) {
                "transient"
            } else {
                "permanent"
            }
        );
        if let Some(hint) = p.hint.filter(|h| !h.is_empty()) {
            let _ = write!(h, "<div class=\"hint\">Fix: {}</div>", escape(hint));
        }
        if let Some(cmd) = &p.fix_command {
            let _ = write!(h, "<div class=\"fix\"><code>{}</code></div>", escape(cmd));
        }
        if let Some(d) = &p.detail {
            let _ = write!(h, "<div class=\"detail\">{}</div>", escape(d));
        }
        failing_since(h, now, p);
    } else if p.state == "ok" {
        h.push_str("<span class=\"reason\">ok</span>");
    } else {
        h.push_str("<span class=\"muted\">first probe not run yet</span>");
    }
    h.push_str("</td>");
    h.push_str(&time_cell(now, p.last_success));
    h.push_str(&time_cell(now, p.last_run));
    match p.duration_seconds {
        Some(d) => {
            let _ = write!(h, "<td class=\"num\">{:.0} ms</td>", d * 1000.0);
        }
        None => h.push_str("<td class=\"num muted\">-</td>"),
    }
    history_strip(h, p);
    match &p.transcript_url {
        Some(u) => {
            let label = if u.starts_with("/transcript?credential=") {
                "token exchange"
            } else {
                "transcript"
            };
            let _ = write!(h, "<td><a href=\"{}\">{label}</a></td>", escape(u));
        }
        None => h.push_str("<td class=\"muted\">-</td>"),
    }
    h.push_str("</tr>");
}

/// The Credentials table. Client secrets and certificates are coloured as the alerts fire
/// (warning under 14 days, critical under 2); access tokens only when expired.
fn credentials(h: &mut String, now: SystemTime, creds: &[crate::status::CredentialStatus]) {
    h.push_str(
        "<h2>Credentials</h2><table id=\"credentials\"><thead><tr><th>credential</th><th>grant</th>\
         <th>access token expires</th><th>last token</th><th>last token error</th>\
         <th>client secret expires</th><th>certificate expires</th><th>refresh token on disk</th>\
         <th>transcript</th></tr></thead><tbody>",
    );
    for c in creds {
        let failing = c.failing();
        let last_error = match c.last_error {
            None => "<td class=\"muted\">none</td>".to_string(),
            Some(e) => format!(
                "<td class=\"{}\" title=\"{}\"><span class=\"reason\">{}</span><br>{}</td>",
                if failing.is_some() { "bad" } else { "muted" },
                escape(&rfc3339(e.at)),
                e.reason.as_str(),
                escape(&ago(now, e.at)),
            ),
        };
        let exchange = match &c.transcript_url {
            Some(u) => format!("<td><a href=\"{}\">token exchange</a></td>", escape(u)),
            None => "<td class=\"muted\">-</td>".into(),
        };
        use crate::reason::Reason;
        let (save_class, save) = match (&c.save_error, failing.map(|f| f.reason)) {
            (Some(e), _) => ("bad", format!("NOT SAVED: {}", escape(e))),
            (None, _) if c.grant != "refresh_token" => ("muted", "-".into()),
            (None, Some(Reason::TokenInvalidGrant)) => (
                "bad",
                "rejected by the token endpoint (expired or revoked)".into(),
            ),
            (None, Some(Reason::TokenMissing)) => ("bad", "none stored".into()),
            (None, _) => ("", "saved".into()),
        };
        let _ = write!(
            h,
            "<tr data-credential=\"{name}\"><td>{name}</td><td>{grant}</td>{te}{tl}{last_error}{se}{ce}<td{sc}>{save}</td>{exchange}</tr>",
            name = escape(&c.name),
            grant = escape(&c.grant),
            te = access_token_cell(now, c.token_expiry),
            tl = time_cell(now, c.token_last_success),
            se = expiry_cell(now, c.client_secret_expiry),
            ce = expiry_cell(now, c.certificate_expiry),
            sc = class_attr(save_class),
        );
    }
    h.push_str("</tbody></table>");
}

/// The failing rows' reasons with their counts, most frequent first.
fn reason_counts(h: &mut String, probes: &[RowStatus]) {
    let mut counts: std::collections::BTreeMap<crate::reason::Reason, usize> = Default::default();
    for r in probes.iter().filter(|p| p.state == "failed") {
        if let Some(reason) = r.reason {
            *counts.entry(reason).or_default() += 1;
        }
    }
    if counts.is_empty() {
        return;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by_key(|(r, n)| (std::cmp::Reverse(*n), r.is_transient(), *r));
    h.push_str("<div class=\"reasons\" id=\"reason-counts\">");
    for (reason, n) in counts {
        let _ = write!(
            h,
            "<span class=\"{kind}\" id=\"count-reason-{r}\" title=\"{hint}\"><b>{n}</b> {r}</span>",
            kind = if reason.is_transient() {
                "transient"
            } else {
                "permanent"
            },
            r = reason.as_str(),
            hint = escape(reason.hint()),
        );
    }
    h.push_str("</div>");
}

/// "failing since" with the streak's start, and how long ago that was.
fn failing_since(h: &mut String, now: SystemTime, p: &RowStatus) {
    if let Some(t) = p.failing_since {
        let _ = write!(
            h,
            "<div class=\"since\">failing since {} ({})</div>",
            escape(&rfc3339(t)),
            escape(&ago(now, t))
        );
    }
}

/// The last probes as coloured ticks, oldest left; hovering one shows its time and reason.
fn history_strip(h: &mut String, p: &RowStatus) {
    if p.history.is_empty() {
        h.push_str("<td class=\"muted\">-</td>");
        return;
    }
    h.push_str("<td><div class=\"strip\">");
    for e in &p.history {
        let kind = match e.reason {
            crate::reason::Reason::Ok => "ok",
            r if r.is_transient() => "transient",
            _ => "permanent",
        };
        let _ = write!(
            h,
            "<span class=\"tick {kind}\" title=\"{} {}\"></span>",
            escape(&rfc3339(e.at)),
            e.reason.as_str()
        );
    }
    h.push_str("</div></td>");
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::reason::Reason;
    use crate::status::{CredentialStatus, TokenFailure};

    /// The Credentials row of `name` in the rendered table.
    fn credential_row(creds: &[CredentialStatus], now: SystemTime, name: &str) -> String {
        let mut h = String::new();
        credentials(&mut h, now, creds);
        let start = h.find(&format!("<tr data-credential=\"{name}\">")).unwrap();
        h[start..].split("</tr>").next().unwrap().to_string()
    }

    #[test]
    fn credentials_are_coloured_by_kind() {
        let now = SystemTime::now();
        let min = |m: u64| now + Duration::from_secs(60 * m);
        let day = |d: u64| now + Duration::from_secs(86_400 * d);
        let creds = vec![
            CredentialStatus {
                name: "fresh-token".into(),
                grant: "client_credentials".into(),
                token_expiry: Some(min(57)),
                token_last_success: Some(now),
                client_secret_expiry: Some(day(10)),
                certificate_expiry: Some(day(30)),
                ..Default::default()
            },
            CredentialStatus {
                name: "ending".into(),
                grant: "client_credentials".into(),
                token_expiry: Some(now - Duration::from_secs(5)),
                client_secret_expiry: Some(min(60 * 24 + 30)),
                ..Default::default()
            },
        ];
        let fresh = credential_row(&creds, now, "fresh-token");
        // A token with 57 minutes left is fine; a secret 10 days from expiry warns.
        let token_cell = fresh.split("<td").nth(3).unwrap();
        assert!(
            token_cell.starts_with(" title=\"") && token_cell.ends_with(">in 57 min</td>"),
            "{fresh}"
        );
        assert!(!fresh.contains("class=\"bad\""), "{fresh}");
        assert!(fresh.contains("class=\"warn\" title=\""), "{fresh}");
        assert!(fresh.contains(">in 10 days</td>") || fresh.contains(">in 9 days</td>"));
        assert!(fresh.contains(">in 30 days</td>") || fresh.contains(">in 29 days</td>"));
        assert_eq!(fresh.matches("class=\"warn\"").count(), 1, "{fresh}");
        let ending = credential_row(&creds, now, "ending");
        assert!(
            ending.contains("class=\"warn\"") && ending.contains(">expired</td>"),
            "{ending}"
        );
        assert!(
            ending.contains("class=\"bad\"") && ending.contains(">in 24 h</td>"),
            "{ending}"
        );
    }

    #[test]
    fn a_revoked_refresh_token_is_not_saved_and_its_error_shows() {
        let now = SystemTime::now();
        let earlier = now - Duration::from_secs(600);
        let revoked = CredentialStatus {
            name: "former-user".into(),
            grant: "refresh_token".into(),
            token_last_success: Some(earlier),
            last_error: Some(TokenFailure {
                reason: Reason::TokenInvalidGrant,
                at: now,
            }),
            ..Default::default()
        };
        let mut recovered = revoked.clone();
        recovered.name = "recovered".into();
        recovered.last_error = Some(TokenFailure {
            reason: Reason::TokenNetworkError,
            at: earlier - Duration::from_secs(60),
        });
        let creds = vec![revoked, recovered];
        let row = credential_row(&creds, now, "former-user");
        assert!(!row.contains(">saved<"), "{row}");
        assert!(row.contains("rejected by the token endpoint"), "{row}");
        assert!(row.contains("<td class=\"bad\" title=\""), "{row}");
        assert!(
            row.contains("token_invalid_grant</span><br>0 s ago"),
            "{row}"
        );
        let row = credential_row(&creds, now, "recovered");
        assert!(row.contains(">saved<"), "{row}");
        assert!(row.contains("<td class=\"muted\" title=\""), "{row}");
        assert!(
            row.contains("token_network_error</span><br>11 min ago"),
            "{row}"
        );
    }

    #[test]
    fn escape_neutralises_markup() {
        assert_eq!(
            escape("<script>alert(\"x\")</script>&'"),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
    }
}
