//! The prober against the emulated provider on real sockets: success on every protocol,
//! TLS mode and mechanism; the seed's dialogues; every behaviour's reason; hostile servers
//! ending within the deadline.

use mail_oauth_exporter::emulator::{
    Behaviour, CertKind, Emulator, EmulatorOptions, Proto, ServerBehaviour, StaticTokens, TlsKind,
};
use mail_oauth_exporter::probe::{self, Limits, Phase, ProbeReport, ProbeSpec, Target, TlsClient};
use mail_oauth_exporter::status::ProbeResult;
use mail_oauth_exporter::{Mechanism, Protocol, Reason, Secret, TlsMode};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const TOKEN: &str = "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA-valid";
/// The token of the seed's transcripts (user someuser@example.com).
const SEED_TOKEN: &str = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg";
const SEED_B64: &str = "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==";

pub fn options() -> EmulatorOptions {
    EmulatorOptions::new(Arc::new(StaticTokens::new([TOKEN, SEED_TOKEN])))
}

pub async fn start(options: EmulatorOptions) -> (Emulator, TlsClient) {
    let emu = Emulator::start(options).await.expect("emulator starts");
    let tls = TlsClient::with_ca_pem(emu.ca_pem().as_bytes()).expect("CA loads");
    (emu, tls)
}

fn proto(p: Protocol) -> Proto {
    match p {
        Protocol::Imap => Proto::Imap,
        Protocol::Pop3 => Proto::Pop3,
        Protocol::Smtp => Proto::Smtp,
    }
}

pub fn spec(emu: &Emulator, p: Protocol, tls: TlsMode, mech: Mechanism, user: &str) -> ProbeSpec {
    let kind = match tls {
        TlsMode::Implicit => TlsKind::Implicit,
        TlsMode::Starttls => TlsKind::Starttls,
    };
    let addr = emu.addr(proto(p), kind);
    ProbeSpec {
        target: Target {
            protocol: p,
            host: "127.0.0.1".into(),
            port: addr.port(),
            tls,
            source_address: None,
        },
        user: user.into(),
        mechanism: mech,
        timeout: Duration::from_secs(3),
        limits: Limits::default(),
    }
}

async fn run(
    emu: &Emulator,
    tls: &TlsClient,
    p: Protocol,
    mode: TlsMode,
    user: &str,
    token: &str,
) -> ProbeReport {
    probe::run(
        &spec(emu, p, mode, Mechanism::Xoauth2, user),
        tls,
        &Secret::new(token),
    )
    .await
}

fn reason(r: &ProbeReport) -> Reason {
    ProbeResult::from_report(r).reason
}

fn assert_no_secret(r: &ProbeReport, secrets: &[&str]) {
    let text = r.transcript.render();
    for s in secrets {
        assert!(!text.contains(s), "secret {s} in transcript:\n{text}");
    }
}

#[tokio::test]
async fn every_protocol_tls_mode_and_mechanism_logs_in() {
    let (emu, tls) = start(options()).await;
    for p in Protocol::ALL {
        for mode in [TlsMode::Implicit, TlsMode::Starttls] {
            for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
                let spec = spec(&emu, p, mode, mech, "helpdesk@contoso.com");
                let r = probe::run(&spec, &tls, &Secret::new(TOKEN)).await;
                let what = format!("{p} {mode:?} {mech:?}:\n{}", r.transcript);
                assert_eq!(r.outcome, Ok(()), "{what}");
                for phase in Phase::ALL {
                    assert!(r.phases.get(phase).is_some(), "{phase} not timed: {what}");
                }
                let d = r.duration.expect("duration up to the auth reply");
                assert!(d <= r.total, "{what}");
                assert_eq!(r.tls_not_after, Some(emu.cert_not_after()), "{what}");
                let ir = probe::sasl::initial_response(
                    mech,
                    "helpdesk@contoso.com",
                    &Secret::new(TOKEN),
                    "127.0.0.1",
                    spec.target.port,
                );
                assert_no_secret(&r, &[TOKEN, ir.expose()]);
                assert!(r.transcript.render().contains("<redacted>"), "{what}");
                // The post-auth check and the polite goodbye were really sent.
                let sent = emu.received(proto(p)).join("\n");
                let check = match p {
                    Protocol::Imap => "E01 EXAMINE INBOX",
                    Protocol::Pop3 => "STAT",
                    Protocol::Smtp => "NOOP",
                };
                assert!(sent.contains(check), "{what}\nserver got:\n{sent}");
                emu.clear_received();
            }
        }
    }
}

/// The seed's success and failure dialogues, as the prober really sends them.
#[tokio::test]
async fn the_seeds_dialogues_are_reproduced() {
    let mut opts = options();
    opts.users
        .insert("refused@example.com".into(), Behaviour::TokenRefused);
    let (emu, tls) = start(opts).await;
    let user = "someuser@example.com";

    // IMAP: SASL-IR is advertised, so the base64 goes on the AUTHENTICATE line.
    let r = run(
        &emu,
        &tls,
        Protocol::Imap,
        TlsMode::Implicit,
        user,
        SEED_TOKEN,
    )
    .await;
    assert_eq!(r.outcome, Ok(()), "{}", r.transcript);
    let got = emu.received(Proto::Imap);
    assert_eq!(got[0], "C01 CAPABILITY");
    assert_eq!(got[1], format!("A01 AUTHENTICATE XOAUTH2 {SEED_B64}"));
    let t = r.transcript.render();
    assert!(t.contains("S: C01 OK Completed"), "{t}");
    assert!(t.contains("S: A01 OK AUTHENTICATE completed."), "{t}");
    assert!(t.contains("C: A01 AUTHENTICATE XOAUTH2 <redacted>"), "{t}");

    // POP3: AUTH XOAUTH2, `+`, the base64 on its own line.
    emu.clear_received();
    let r = run(
        &emu,
        &tls,
        Protocol::Pop3,
        TlsMode::Implicit,
        user,
        SEED_TOKEN,
    )
    .await;
    assert_eq!(r.outcome, Ok(()), "{}", r.transcript);
    let got = emu.received(Proto::Pop3);
    let at = got
        .iter()
        .position(|l| l == "AUTH XOAUTH2")
        .expect("AUTH XOAUTH2 sent");
    assert_eq!(got[at + 1], SEED_B64);
    assert!(
        r.transcript
            .render()
            .contains("S: +OK User successfully authenticated.")
    );

    // SMTP: the seed's short token fits the 512-octet line, so it goes as initial response.
    emu.clear_received();
    let r = run(
        &emu,
        &tls,
        Protocol::Smtp,
        TlsMode::Starttls,
        user,
        SEED_TOKEN,
    )
    .await;
    assert_eq!(r.outcome, Ok(()), "{}", r.transcript);
    assert!(
        emu.received(Proto::Smtp)
            .contains(&format!("AUTH XOAUTH2 {SEED_B64}"))
    );
    assert!(
        r.transcript
            .render()
            .contains("S: 235 2.7.0 Authentication successful")
    );

    // The failures, with the seed's exact replies kept as detail.
    let failures = [
        (
            Protocol::Imap,
            TlsMode::Implicit,
            "A01 NO AUTHENTICATE failed.",
        ),
        (
            Protocol::Pop3,
            TlsMode::Implicit,
            "-ERR Authentication failure: unknown user name or bad password.",
        ),
        (
            Protocol::Smtp,
            TlsMode::Starttls,
            "535 5.7.3 Authentication unsuccessful [SN2PR00CA0018.namprd00.prod.outlook.com]",
        ),
    ];
    for (p, mode, reply) in failures {
        let r = run(&emu, &tls, p, mode, user, "not-a-token-the-server-knows").await;
        let c = ProbeResult::from_report(&r);
        assert_eq!(c.reason, Reason::AuthRejected, "{p}: {}", r.transcript);
        assert_eq!(c.detail, reply, "{p}");
        assert!(r.duration.is_some(), "{p}: the auth reply was timed");
        assert!(
            r.phases.get(Phase::PostAuth).is_none(),
            "{p}: no post-auth after a refusal"
        );
    }
}

/// A token longer than SMTP's line limit goes after a `334` (Dovecot refuses long lines).
#[tokio::test]
async fn smtp_uses_the_continuation_for_long_tokens() {
    let long = format!("{TOKEN}{}", "x".repeat(1500));
    let mut opts = EmulatorOptions::new(Arc::new(StaticTokens::new([long.as_str()])));
    opts.smtp_max_auth_line = Some(mail_oauth_exporter::emulator::DOVECOT_SMTP_MAX_AUTH_LINE);
    let (emu, tls) = start(opts).await;
    let r = run(
        &emu,
        &tls,
        Protocol::Smtp,
        TlsMode::Starttls,
        "a@b.c",
        &long,
    )
    .await;
    assert_eq!(r.outcome, Ok(()), "{}", r.transcript);
    let got = emu.received(Proto::Smtp);
    assert!(got.contains(&"AUTH XOAUTH2".to_string()), "{got:?}");
    assert_no_secret(&r, &[&long]);
}

#[tokio::test]
async fn each_behaviour_ends_in_its_reason() {
    use Behaviour as B;
    use Protocol::*;
    use Reason as R;
    let cases: &[(B, Protocol, R)] = &[
        (B::TokenRefused, Imap, R::AuthRejected),
        (B::TokenRefused, Pop3, R::AuthRejected),
        (B::TokenRefused, Smtp, R::AuthRejected),
        (B::SmtpAuthDisabled, Smtp, R::SmtpAuthDisabled),
        (B::SmtpAuthDisabledMailbox, Smtp, R::SmtpAuthDisabled),
        (B::SmtpAuthDisabled, Imap, R::Ok),
        (B::PolicyBlocked, Smtp, R::AuthPolicyBlocked),
        (B::ConditionalAccess, Smtp, R::AuthPolicyBlocked),
        (B::AuthenticatedNotConnected, Imap, R::MailboxUnavailable),
        (B::AuthenticatedNotConnected, Pop3, R::MailboxUnavailable),
        (B::AuthenticatedNotConnected, Smtp, R::MailboxUnavailable),
        (B::Throttled, Imap, R::Throttled),
        (B::Throttled, Pop3, R::Throttled),
        (B::Throttled, Smtp, R::Throttled),
        (B::ErrorChallenge, Imap, R::AuthRejected),
        (B::ErrorChallenge, Pop3, R::AuthRejected),
        (B::ErrorChallenge, Smtp, R::AuthRejected),
        (B::TokenExpiring, Imap, R::AuthTokenExpired),
        (B::TokenExpiring, Pop3, R::AuthTokenExpired),
        (B::TokenExpiring, Smtp, R::AuthTokenExpired),
        (B::TemporaryFailure, Imap, R::ServerUnavailable),
        (B::TemporaryFailure, Pop3, R::ServerUnavailable),
        (B::TemporaryFailure, Smtp, R::ServerUnavailable),
        (B::ServerError451, Smtp, R::ServerUnavailable),
        (B::TryAgainLater, Smtp, R::Throttled),
    ];
    let (emu, tls) = start(options()).await;
    for (i, (behaviour, p, want)) in cases.iter().enumerate() {
        let user = format!("user{i}@contoso.com");
        emu.set_behaviour(&user, *behaviour);
        for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
            let mode = if *p == Smtp {
                TlsMode::Starttls
            } else {
                TlsMode::Implicit
            };
            let r = probe::run(
                &spec(&emu, *p, mode, mech, &user),
                &tls,
                &Secret::new(TOKEN),
            )
            .await;
            let c = ProbeResult::from_report(&r);
            assert_eq!(
                c.reason, *want,
                "{behaviour:?} {p} {mech:?}: {}\n{}",
                c.detail, r.transcript
            );
            if *behaviour == B::ErrorChallenge {
                // The decoded challenge JSON is kept beside the final reply.
                assert!(
                    c.detail.contains("(challenge: {\"status\":"),
                    "{}",
                    c.detail
                );
                let answer = if mech == Mechanism::Xoauth2 {
                    "C: \n"
                } else {
                    "C: AQ=="
                };
                let t = r.transcript.render();
                assert!(t.contains(answer), "{t}");
            }
        }
    }
}

/// Hostile and broken servers: each ends in its reason, within the probe's deadline.
#[tokio::test]
async fn hostile_servers_end_within_the_deadline() {
    use Protocol::*;
    use Reason as R;
    use ServerBehaviour as S;
    let cases: &[(S, Protocol, TlsMode, R)] = &[
        (S::Silent, Imap, TlsMode::Starttls, R::Timeout),
        (S::Silent, Pop3, TlsMode::Starttls, R::Timeout),
        (S::Silent, Smtp, TlsMode::Starttls, R::Timeout),
        (S::Silent, Imap, TlsMode::Implicit, R::Timeout),
        (S::EndlessLine, Imap, TlsMode::Starttls, R::ProtocolError),
        (S::EndlessLine, Smtp, TlsMode::Implicit, R::ProtocolError),
        (S::Trickle, Pop3, TlsMode::Starttls, R::Timeout),
        (S::Trickle, Smtp, TlsMode::Starttls, R::Timeout),
        (S::Garbage, Imap, TlsMode::Starttls, R::ProtocolError),
        (S::Garbage, Smtp, TlsMode::Implicit, R::ProtocolError),
        (
            S::ResetAfterGreeting,
            Imap,
            TlsMode::Implicit,
            R::ProtocolError,
        ),
        (
            S::ResetAfterGreeting,
            Smtp,
            TlsMode::Starttls,
            R::ProtocolError,
        ),
        (
            S::ResetAfterCapability,
            Pop3,
            TlsMode::Implicit,
            R::ProtocolError,
        ),
        (S::ResetAtAuth, Imap, TlsMode::Implicit, R::ProtocolError),
        (S::ResetAtAuth, Pop3, TlsMode::Implicit, R::ProtocolError),
        (S::ResetAtAuth, Smtp, TlsMode::Starttls, R::ProtocolError),
        (
            S::ByeGreeting,
            Imap,
            TlsMode::Implicit,
            R::ServerUnavailable,
        ),
        (
            S::ByeGreeting,
            Pop3,
            TlsMode::Implicit,
            R::ServerUnavailable,
        ),
        (
            S::ByeGreeting,
            Smtp,
            TlsMode::Starttls,
            R::ServerUnavailable,
        ),
        (
            S::NoStarttls,
            Imap,
            TlsMode::Starttls,
            R::StarttlsUnavailable,
        ),
        (
            S::NoStarttls,
            Pop3,
            TlsMode::Starttls,
            R::StarttlsUnavailable,
        ),
        (
            S::NoStarttls,
            Smtp,
            TlsMode::Starttls,
            R::StarttlsUnavailable,
        ),
        (
            S::RefuseStarttls,
            Imap,
            TlsMode::Starttls,
            R::StarttlsUnavailable,
        ),
        (
            S::RefuseStarttls,
            Pop3,
            TlsMode::Starttls,
            R::StarttlsUnavailable,
        ),
        (
            S::RefuseStarttls,
            Smtp,
            TlsMode::Starttls,
            R::StarttlsUnavailable,
        ),
        (
            S::NoXoauth2,
            Imap,
            TlsMode::Implicit,
            R::MechanismUnsupported,
        ),
        (
            S::NoXoauth2,
            Pop3,
            TlsMode::Starttls,
            R::MechanismUnsupported,
        ),
        (
            S::NoXoauth2,
            Smtp,
            TlsMode::Starttls,
            R::MechanismUnsupported,
        ),
        (S::ConcurrentLimit, Smtp, TlsMode::Starttls, R::Throttled),
        (
            S::OldTlsRejected,
            Smtp,
            TlsMode::Starttls,
            R::TlsHandshakeFailed,
        ),
        (S::NoTls, Imap, TlsMode::Implicit, R::TlsHandshakeFailed),
        (S::NoTls, Pop3, TlsMode::Implicit, R::TlsHandshakeFailed),
        (S::OfferAuthBeforeTls, Imap, TlsMode::Starttls, R::Ok),
        (S::OfferAuthBeforeTls, Pop3, TlsMode::Starttls, R::Ok),
        (S::OfferAuthBeforeTls, Smtp, TlsMode::Starttls, R::Ok),
    ];
    let mut opts = options();
    opts.idle_timeout = Duration::from_secs(30);
    let (emu, tls) = start(opts).await;
    for (behaviour, p, mode, want) in cases {
        emu.set_server_behaviour(*behaviour);
        emu.clear_received();
        let mut spec = spec(&emu, *p, *mode, Mechanism::Xoauth2, "a@contoso.com");
        spec.timeout = Duration::from_millis(1500);
        let started = Instant::now();
        let r = probe::run(&spec, &tls, &Secret::new(TOKEN)).await;
        let took = started.elapsed();
        let what = format!("{behaviour:?} {p} {mode:?} ({took:?}):\n{}", r.transcript);
        assert_eq!(reason(&r), *want, "{what}");
        // The deadline holds; the margin is the courtesy close, not a speed target.
        assert!(took < spec.timeout + Duration::from_millis(900), "{what}");
        // Whatever the server offered in clear, the token went over TLS only: the
        // emulator's log of plaintext-port lines before STARTTLS holds no AUTH.
        let sent = emu.received(proto(*p));
        if let Some(tls_at) = sent
            .iter()
            .position(|l| l.ends_with("STARTTLS") || l == "STLS")
        {
            assert!(
                !sent[..tls_at]
                    .iter()
                    .any(|l| l.to_ascii_uppercase().contains("AUTH")),
                "{what}\n{sent:?}"
            );
        }
    }
}

#[tokio::test]
async fn bad_certificates_are_tls_certificate_invalid() {
    for kind in [CertKind::Expired, CertKind::WrongName, CertKind::Untrusted] {
        let mut opts = options();
        opts.certificate = kind;
        let (emu, tls) = start(opts).await;
        for (p, mode) in [
            (Protocol::Imap, TlsMode::Implicit),
            (Protocol::Smtp, TlsMode::Starttls),
        ] {
            let r = run(&emu, &tls, p, mode, "a@b.c", TOKEN).await;
            assert_eq!(
                reason(&r),
                Reason::TlsCertificateInvalid,
                "{kind:?} {p}: {}",
                r.transcript
            );
            // No token may leave before a trusted handshake.
            assert!(
                !emu.received(proto(p)).iter().any(|l| l.contains("AUTH")),
                "{kind:?} {p}"
            );
        }
    }
}

#[tokio::test]
async fn connect_failures() {
    let (emu, tls) = start(options()).await;
    // A port nobody listens on: bind, learn the port, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut s = spec(
        &emu,
        Protocol::Imap,
        TlsMode::Implicit,
        Mechanism::Xoauth2,
        "a@b.c",
    );
    s.target.port = port;
    let r = probe::run(&s, &tls, &Secret::new(TOKEN)).await;
    assert_eq!(reason(&r), Reason::ConnectRefused, "{}", r.transcript);
    s.target.host = "no-such-host.invalid".into();
    let r = probe::run(&s, &tls, &Secret::new(TOKEN)).await;
    assert_eq!(reason(&r), Reason::DnsError, "{}", r.transcript);
    assert!(r.phases.get(Phase::Resolve).is_some());
}

/// A slow server's delay shows in the auth phase, not elsewhere.
#[tokio::test]
async fn slow_server_delay_is_measured_in_the_auth_phase() {
    let mut opts = options();
    opts.slow_delay = Duration::from_millis(300);
    opts.users
        .insert("slow@contoso.com".into(), Behaviour::Slow);
    let (emu, tls) = start(opts).await;
    let r = run(
        &emu,
        &tls,
        Protocol::Imap,
        TlsMode::Implicit,
        "slow@contoso.com",
        TOKEN,
    )
    .await;
    assert_eq!(r.outcome, Ok(()), "{}", r.transcript);
    let auth = r.phases.get(Phase::Auth).unwrap();
    assert!(auth >= Duration::from_millis(300), "auth {auth:?}");
    assert!(r.phases.get(Phase::Greeting).unwrap() < Duration::from_millis(300));
}

/// Every mail reply recorded from the field (`src/emulator/field_replies.txt`), served by
/// the emulator at its stage and protocol, ends in the reason the record names; the
/// server's own words are the detail. Other protocols of the same user still log in.
#[tokio::test]
async fn field_replies_over_real_sockets() {
    use mail_oauth_exporter::emulator::field::{Kind, replies};
    let (emu, tls) = start(options()).await;
    let mut served = 0;
    for (i, f) in replies().iter().enumerate() {
        let Kind::Mail {
            protocol,
            challenge,
            ..
        } = f.kind
        else {
            continue;
        };
        let user = format!("field{i}@contoso.com");
        emu.set_behaviour(&user, Behaviour::Field(i));
        for mech in [Mechanism::Xoauth2, Mechanism::Oauthbearer] {
            let mode = if protocol == Protocol::Smtp {
                TlsMode::Starttls
            } else {
                TlsMode::Implicit
            };
            let r = probe::run(
                &spec(&emu, protocol, mode, mech, &user),
                &tls,
                &Secret::new(TOKEN),
            )
            .await;
            let c = ProbeResult::from_report(&r);
            assert_eq!(
                c.reason, f.reason,
                "line {} ({}) {mech:?}: {}\n{}",
                f.line, f.source, c.detail, r.transcript
            );
            let first_line = f.reply.lines().next().unwrap_or_default();
            assert!(
                c.detail.contains(first_line),
                "line {}: detail {:?}",
                f.line,
                c.detail
            );
            if challenge {
                assert!(
                    c.detail.contains("(challenge: {\"status\":"),
                    "{}",
                    c.detail
                );
            }
            served += 1;
        }
        // The record is about one protocol: the user's others are healthy.
        let other = Protocol::ALL
            .into_iter()
            .find(|p| *p != protocol)
            .unwrap_or(Protocol::Imap);
        let mode = if other == Protocol::Smtp {
            TlsMode::Starttls
        } else {
            TlsMode::Implicit
        };
        let r = run(&emu, &tls, other, mode, &user, TOKEN).await;
        assert_eq!(reason(&r), Reason::Ok, "line {}: {other}", f.line);
    }
    assert!(served >= 20, "only {served} field replies served");
}
