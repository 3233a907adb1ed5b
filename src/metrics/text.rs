//! Writing the two exposition formats a scraper may ask for: the Prometheus text format
//! 0.0.4 and OpenMetrics 1.0.0. Label values and HELP texts are escaped here, numbers are
//! written without going through `fmt`, each family gets its HELP and TYPE once, and the
//! body is gzip-compressed as it is written when the scraper accepts it.

use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;

/// The exposition format of a scrape's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what every Prometheus and curl understands.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`: what Prometheus prefers when offered.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format an `Accept` header (RFC 9110, 12.5.1) prefers: OpenMetrics when it is
    /// accepted with a q-value at least as high as the text format's, else the text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut om, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0f32;
            let mut om_version_ok = true;
            for p in parts {
                if let Some((k, v)) = p.split_once('=') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "q" => q = v.trim().parse().unwrap_or(0.0),
                        // We write 1.0.0; 0.0.1 is the same text for what we expose.
                        "version" => om_version_ok = matches!(v.trim(), "1.0.0" | "0.0.1"),
                        _ => {}
                    }
                }
            }
            match media.as_str() {
                "application/openmetrics-text" if om_version_ok => om = om.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }
}

/// Whether an `Accept-Encoding` header (RFC 9110, 12.5.3) accepts gzip.
pub fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    accept_encoding.is_some_and(|h| {
        h.split(',').any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let q = parts
                .find_map(|p| {
                    p.strip_prefix("q=")
                        .map(|v| v.trim().parse().unwrap_or(0.0))
                })
                .unwrap_or(1.0f32);
            (name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip")) && q > 0.0
        })
    })
}

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Gauge,
    Counter,
    Histogram,
    Unknown,
}

/// Appends `key="value",...` with every value escaped (`\`, `"`, line feed), the form
/// both formats share.
pub fn label_pairs(pairs: &[(&str, &str)]) -> String {
    let mut out = Vec::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"=\"");
        escape_label_value(&mut out, v);
        out.push(b'"');
    }
    // Only ASCII was added around valid UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

fn escape_label_value(out: &mut Vec<u8>, v: &str) {
    let bytes = v.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'"' => b"\\\"",
            b'\n' => b"\\n",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Uncompressed bytes gathered before they go to the gzip encoder in one piece.
const GZIP_CHUNK: usize = 64 * 1024;
/// About how much of the body is rendered at a time when it is sent as it is rendered.
pub(crate) const CHUNK: usize = 64 * 1024;

/// A sample's value, written exactly: counts as integers, durations and times as decimal
/// fractions of whole microseconds or milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value {
    U64(u64),
    F64(f64),
    /// Microseconds, written as seconds.
    Micros(u64),
    /// Milliseconds since the Unix epoch, written as seconds.
    UnixMillis(i64),
}

/// The body being written.
pub(crate) struct Out {
    format: Format,
    buf: Vec<u8>,
    gzip: Option<GzEncoder<Vec<u8>>>,
    /// Uncompressed bytes already handed to the encoder.
    spilled: usize,
}

/// One family of the body: its header goes out before its first sample, once.
pub(crate) struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    started: bool,
}

impl Family {
    pub const fn new(name: &'static str, help: &'static str, kind: Kind) -> Family {
        Family {
            name,
            help,
            kind,
            started: false,
        }
    }
}

impl Out {
    pub fn new(format: Format, gzip: bool) -> Out {
        let gzip = gzip.then(|| {
            // Level 1: this text compresses about 15-fold even so, for a fraction of the
            // CPU of the default level.
            GzEncoder::new(Vec::with_capacity(CHUNK / 8), Compression::fast())
        });
        Out {
            format,
            buf: Vec::with_capacity(CHUNK + 4096),
            gzip,
            spilled: 0,
        }
    }

    /// Writes a family's HELP and TYPE (from its name, help and kind as given, escaped).
    pub fn header(&mut self, name: &str, help: &str, kind: Kind) {
        let om = self.format == Format::OpenMetrics;
        // OpenMetrics names a counter family without the `_total` its samples carry.
        let family = match (om, kind) {
            (true, Kind::Counter) => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        self.buf.extend_from_slice(b"# HELP ");
        self.buf.extend_from_slice(family.as_bytes());
        self.buf.push(b' ');
        let bytes = help.as_bytes();
        let mut start = 0;
        for (i, b) in bytes.iter().enumerate() {
            let esc: &[u8] = match b {
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'"' if om => b"\\\"",
                _ => continue,
            };
            self.buf.extend_from_slice(&bytes[start..i]);
            self.buf.extend_from_slice(esc);
            start = i + 1;
        }
        self.buf.extend_from_slice(&bytes[start..]);
        self.buf.extend_from_slice(b"\n# TYPE ");
        self.buf.extend_from_slice(family.as_bytes());
        self.buf.extend_from_slice(match (kind, om) {
            (Kind::Gauge, _) => b" gauge\n",
            (Kind::Counter, _) => b" counter\n",
            (Kind::Histogram, _) => b" histogram\n",
            (Kind::Unknown, true) => b" unknown\n",
            (Kind::Unknown, false) => b" untyped\n",
        });
    }

    /// One sample of `family`: `name{labels,extra="v"} value`. `labels` is already
    /// escaped ([`label_pairs`]); `extra`'s value is escaped here.
    pub fn sample(
        &mut self,
        family: &mut Family,
        labels: &str,
        extra: Option<(&str, &str)>,
        value: Value,
    ) {
        if !family.started {
            family.started = true;
            self.header(family.name, family.help, family.kind);
        }
        self.line(family.name, labels, extra, value);
    }

    /// A sample line under a header already written.
    pub fn line(&mut self, name: &str, labels: &str, extra: Option<(&str, &str)>, value: Value) {
        let b = &mut self.buf;
        b.extend_from_slice(name.as_bytes());
        if !labels.is_empty() || extra.is_some() {
            b.push(b'{');
            b.extend_from_slice(labels.as_bytes());
            if let Some((k, v)) = extra {
                if !labels.is_empty() {
                    b.push(b',');
                }
                b.extend_from_slice(k.as_bytes());
                b.extend_from_slice(b"=\"");
                escape_label_value(b, v);
                b.push(b'"');
            }
            b.push(b'}');
        }
        b.push(b' ');
        match value {
            Value::U64(v) => b.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
            Value::F64(v) => write_f64(b, v),
            Value::Micros(v) => write_fixed(b, i128::from(v), 1_000_000, 6),
            Value::UnixMillis(v) => write_fixed(b, i128::from(v), 1_000, 3),
        }
        b.push(b'\n');
        if self.gzip.is_some() && self.buf.len() >= GZIP_CHUNK {
            self.spill();
        }
    }

    fn spill(&mut self) {
        if let Some(gz) = &mut self.gzip {
            // Writing into a Vec cannot fail.
            let _ = gz.write_all(&self.buf);
            self.spilled += self.buf.len();
            self.buf.clear();
        }
    }

    /// Uncompressed bytes written so far.
    pub fn written(&self) -> usize {
        self.spilled + self.buf.len()
    }

    /// Uncompressed bytes waiting in the buffer (the gzip encoder's input not counted).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The body bytes ready to send: the buffer as written, or what the encoder produced
    /// from it so far.
    pub fn take_chunk(&mut self) -> Vec<u8> {
        match &mut self.gzip {
            None => {
                self.spilled += self.buf.len();
                std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 4096))
            }
            Some(_) => {
                self.spill();
                let gz = self.gzip.as_mut().expect("gzip");
                std::mem::take(gz.get_mut())
            }
        }
    }

    /// The last bytes of the body (OpenMetrics' `# EOF`, the gzip trailer).
    pub fn finish_chunk(&mut self) -> Vec<u8> {
        if self.format == Format::OpenMetrics {
            self.buf.extend_from_slice(b"# EOF\n");
        }
        let mut last = self.take_chunk();
        if let Some(gz) = &mut self.gzip {
            // Compressing into a Vec cannot fail.
            let _ = gz.try_finish();
            last.append(gz.get_mut());
        }
        last
    }

    /// The whole body at once (OpenMetrics' `# EOF` added), compressed if asked.
    #[cfg(test)]
    pub fn finish(mut self) -> Vec<u8> {
        let mut body = self.take_chunk();
        body.extend(self.finish_chunk());
        body
    }
}

/// `v / unit` with `digits` decimals, trailing zeros (and a bare point) left out.
fn write_fixed(b: &mut Vec<u8>, v: i128, unit: i128, digits: usize) {
    if v < 0 {
        b.push(b'-');
    }
    let v = v.unsigned_abs();
    let unit = unit.unsigned_abs();
    let mut itoa = itoa::Buffer::new();
    b.extend_from_slice(itoa.format(v / unit).as_bytes());
    let frac = v % unit;
    if frac == 0 {
        return;
    }
    b.push(b'.');
    let digits_str = itoa.format(frac);
    for _ in digits_str.len()..digits {
        b.push(b'0');
    }
    b.extend_from_slice(digits_str.trim_end_matches('0').as_bytes());
}

fn write_f64(b: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        b.extend_from_slice(b"NaN");
    } else if v.is_infinite() {
        b.extend_from_slice(if v > 0.0 { b"+Inf" } else { b"-Inf" });
    } else if v == v.trunc() && v.abs() < 1e15 {
        b.extend_from_slice(itoa::Buffer::new().format(v as i64).as_bytes());
    } else {
        let _ = write!(b, "{v}");
    }
}

/// A histogram bucket bound as both formats want it (`0.05`, `1.0`, `+Inf`).
pub(crate) fn bound(v: f64) -> String {
    if v.is_infinite() {
        "+Inf".into()
    } else {
        format!("{v:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut Out)) -> String {
        let mut out = Out::new(Format::Prometheus, false);
        f(&mut out);
        String::from_utf8(out.finish()).unwrap()
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            label_pairs(&[("mailbox", "a\"b\\c\nd"), ("protocol", "imap")]),
            r#"mailbox="a\"b\\c\nd",protocol="imap""#
        );
        assert_eq!(
            label_pairs(&[("x", "plain ünïcode")]),
            "x=\"plain ünïcode\""
        );
    }

    #[test]
    fn numbers_are_exact() {
        let t = text(|o| {
            o.line("a", "", None, Value::Micros(1_234_500));
            o.line("b", "", None, Value::Micros(7));
            o.line("c", "", None, Value::Micros(3_000_000));
            o.line("d", "", None, Value::UnixMillis(1_800_000_000_250));
            o.line("e", "", None, Value::UnixMillis(-1_500));
            o.line("f", "", None, Value::F64(f64::INFINITY));
            o.line("g", "", None, Value::F64(0.25));
            o.line("h", "", None, Value::U64(18_446_744_073_709_551_615));
        });
        assert_eq!(
            t,
            "a 1.2345\nb 0.000007\nc 3\nd 1800000000.25\ne -1.5\nf +Inf\ng 0.25\nh 18446744073709551615\n"
        );
    }

    #[test]
    fn negotiation_follows_q_values() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;version=2.0.0")),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::Prometheus
        );
        assert!(accepts_gzip(Some("gzip")));
        assert!(accepts_gzip(Some("br, GZIP;q=0.5")));
        assert!(!accepts_gzip(Some("gzip;q=0")));
        assert!(!accepts_gzip(Some("identity")));
        assert!(!accepts_gzip(None));
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let mut out = Out::new(Format::OpenMetrics, false);
        let mut f = Family::new("x_total", "Say \"hi\".", Kind::Counter);
        out.sample(&mut f, "a=\"1\"", None, Value::U64(2));
        out.sample(&mut f, "a=\"2\"", None, Value::U64(3));
        let t = String::from_utf8(out.finish()).unwrap();
        assert_eq!(
            t,
            "# HELP x Say \\\"hi\\\".\n# TYPE x counter\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3\n# EOF\n"
        );
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let mut out = Out::new(Format::Prometheus, true);
        let mut f = Family::new("x", "h", Kind::Gauge);
        for i in 0..20_000u64 {
            out.sample(
                &mut f,
                &label_pairs(&[("i", &i.to_string())]),
                None,
                Value::U64(i),
            );
        }
        let gz = out.finish();
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain.lines().count(), 20_002);
        assert!(plain.ends_with("x{i=\"19999\"} 19999\n"));
        assert!(gz.len() * 2 < plain.len());
    }
}
