//! When a certificate is valid, and the error that says one is not: whose
//! certificate it is, its notBefore–notAfter window, this machine's clock and
//! a hint that matches the cause.
//!
//! Certificates count time in whole seconds since the UNIX epoch, and so does
//! everything here; times are shown in UTC (`2026-12-01 10:41:07 UTC`).

use std::fmt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_proto::Escaped;
use rustls_pki_types::CertificateDer;

/// The current time as whole UNIX seconds (negative before 1970).
pub fn unix_now() -> i64 {
    unix_seconds(SystemTime::now())
}

/// A [`SystemTime`] as whole UNIX seconds.
pub fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Shows UNIX seconds as `YYYY-MM-DD HH:MM:SS UTC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utc(pub i64);

impl fmt::Display for Utc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match time::OffsetDateTime::from_unix_timestamp(self.0) {
            Ok(t) => write!(
                f,
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ),
            // Outside what `time` can show (beyond year ±9999): say the number.
            Err(_) => write!(f, "{} s after 1970 UTC", self.0),
        }
    }
}

/// A certificate's validity window: valid from `not_before` to `not_after`,
/// both included (as webpki checks it), in UNIX seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// The first second it is valid.
    pub not_before: i64,
    /// The last second it is valid.
    pub not_after: i64,
}

/// Which side of its window a moment falls on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lapse {
    /// After `not_after`.
    Expired,
    /// Before `not_before`.
    NotYetValid,
}

impl Window {
    /// Reads the window of a DER certificate; `None` if it does not parse.
    pub fn of(cert: &CertificateDer<'_>) -> Option<Window> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
        let v = parsed.validity();
        Some(Window { not_before: v.not_before.timestamp(), not_after: v.not_after.timestamp() })
    }

    /// Where `now` falls outside the window, if it does.
    pub fn lapse(&self, now: i64) -> Option<Lapse> {
        if now > self.not_after {
            Some(Lapse::Expired)
        } else if now < self.not_before {
            Some(Lapse::NotYetValid)
        } else {
            None
        }
    }
}

/// Whose certificate a message is about; it decides the words and the hint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Whose {
    /// This client's own certificate.
    Own {
        /// Its role (`runner`, `observer`, `admin`).
        role: String,
        /// Its name.
        name: String,
        /// Its file.
        path: PathBuf,
    },
    /// The dispatcher's certificate, as a client saw it during the handshake.
    Dispatcher,
    /// The dispatcher's own certificate file, checked as it starts.
    DispatcherFile {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate file (the trust root of a bundle), checked as the dispatcher starts.
    CaFile {
        /// The file.
        path: PathBuf,
    },
    /// A client's certificate, as the dispatcher saw it; the subject comes
    /// from the peer and is shown escaped.
    Client {
        /// The certificate's subject, e.g. `O=Kiln, OU=runner, CN=build-01`.
        subject: String,
    },
}

impl fmt::Display for Whose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Whose::Own { role, name, path } => write!(f, "this {role}'s certificate ({name}, {})", path.display()),
            Whose::Dispatcher => f.write_str("the dispatcher's certificate"),
            Whose::DispatcherFile { path } => write!(f, "the dispatcher's certificate {}", path.display()),
            Whose::CaFile { path } => write!(f, "the CA certificate {}", path.display()),
            Whose::Client { subject } => write!(f, "the client's certificate ({})", Escaped(subject)),
        }
    }
}

/// A certificate used outside its validity window.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct OutOfDate {
    /// Whose certificate.
    pub whose: Whose,
    /// When it is valid.
    pub window: Window,
    /// The clock it was checked against (this machine's).
    pub now: i64,
    /// Which side of the window `now` is on.
    pub lapse: Lapse,
}

impl OutOfDate {
    /// Checks `window` against `now`; `Err` names `whose` certificate.
    pub fn check(whose: Whose, window: Window, now: i64) -> Result<(), OutOfDate> {
        match window.lapse(now) {
            None => Ok(()),
            Some(lapse) => Err(OutOfDate { whose, window, now, lapse }),
        }
    }

    fn hint(&self) -> Option<String> {
        let clock = "check this machine's clock";
        Some(match (&self.whose, self.lapse) {
            (Whose::Own { role, name, .. }, Lapse::Expired) => {
                format!("issue a new one with `kiln certs issue {role} {name}`")
            }
            (Whose::Own { role, name, .. }, Lapse::NotYetValid) => format!(
                "{clock}; if it is right, the certificate was made on a machine whose clock is ahead: issue a new one \
                 with `kiln certs issue {role} {name}` there once its clock is right"
            ),
            (Whose::Dispatcher, Lapse::Expired) => "if this machine's clock is right, the dispatcher needs a new \
                                                   certificate: make one with `kiln certs dispatcher` where the CA is"
                .to_owned(),
            (Whose::Dispatcher, Lapse::NotYetValid) => format!(
                "{clock}; if it is right, the dispatcher's certificate was made on a machine whose clock is ahead: \
                 make a new one with `kiln certs dispatcher` where the CA is"
            ),
            (Whose::DispatcherFile { path }, Lapse::Expired) => format!(
                "if this machine's clock is right, move {} away and make a new one with `kiln certs dispatcher` \
                 where the CA is",
                bundle_dir(path)
            ),
            (Whose::DispatcherFile { path }, Lapse::NotYetValid) => format!(
                "{clock}; if it is right, the certificate was made on a machine whose clock is ahead: move {} away \
                 and make a new one with `kiln certs dispatcher` where the CA is",
                bundle_dir(path)
            ),
            (Whose::CaFile { .. }, Lapse::Expired) => "if this machine's clock is right, the CA has expired: make a \
                                                       new one with `kiln certs init` and issue every peer a new \
                                                       bundle from it"
                .to_owned(),
            (Whose::CaFile { .. }, Lapse::NotYetValid) => format!(
                "{clock}; if it is right, the CA was made on a machine whose clock is ahead: make a new one with \
                 `kiln certs init` and issue every peer a new bundle from it"
            ),
            // The dispatcher's log: the client's operator has the fix.
            (Whose::Client { .. }, _) => return None,
        })
    }
}

/// The bundle directory a certificate file is in, for messages.
fn bundle_dir(path: &std::path::Path) -> std::path::Display<'_> {
    path.parent().unwrap_or(path).display()
}

impl fmt::Display for OutOfDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Window { not_before, not_after } = self.window;
        match self.lapse {
            Lapse::Expired => write!(f, "{} expired at {}", self.whose, Utc(not_after))?,
            Lapse::NotYetValid => write!(f, "{} is not valid until {}", self.whose, Utc(not_before))?,
        }
        write!(
            f,
            " (valid from {} to {}; this machine's clock says {})",
            Utc(not_before),
            Utc(not_after),
            Utc(self.now)
        )?;
        match self.hint() {
            Some(hint) => write!(f, "; {hint}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    // 2026-12-01 00:00:00 UTC.
    const T: i64 = 1_796_083_200;

    fn window() -> Window {
        Window { not_before: T - DAY, not_after: T }
    }

    #[test]
    fn times_show_in_utc() {
        assert_eq!(Utc(T).to_string(), "2026-12-01 00:00:00 UTC");
        assert_eq!(Utc(T + 3_723).to_string(), "2026-12-01 01:02:03 UTC");
        assert_eq!(Utc(0).to_string(), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn the_window_includes_both_ends() {
        let w = window();
        assert_eq!(w.lapse(T - DAY), None);
        assert_eq!(w.lapse(T), None);
        assert_eq!(w.lapse(T + 1), Some(Lapse::Expired));
        assert_eq!(w.lapse(T - DAY - 1), Some(Lapse::NotYetValid));
    }

    #[test]
    fn an_expired_runner_certificate_says_how_to_replace_it() {
        let whose =
            Whose::Own { role: "runner".into(), name: "build-01".into(), path: "certs/build-01/cert.pem".into() };
        let e = OutOfDate::check(whose, window(), T + 90).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this runner's certificate (build-01, certs/build-01/cert.pem) expired at 2026-12-01 00:00:00 UTC \
             (valid from 2026-11-30 00:00:00 UTC to 2026-12-01 00:00:00 UTC; this machine's clock says \
             2026-12-01 00:01:30 UTC); issue a new one with `kiln certs issue runner build-01`"
        );
    }

    #[test]
    fn a_certificate_from_the_future_points_at_the_clock() {
        let e = OutOfDate::check(Whose::Dispatcher, window(), T - 2 * DAY).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the dispatcher's certificate is not valid until 2026-11-30 00:00:00 UTC (valid from 2026-11-30 \
             00:00:00 UTC to 2026-12-01 00:00:00 UTC; this machine's clock says 2026-11-29 00:00:00 UTC); check \
             this machine's clock; if it is right, the dispatcher's certificate was made on a machine whose clock \
             is ahead: make a new one with `kiln certs dispatcher` where the CA is"
        );
    }

    #[test]
    fn a_client_subject_is_escaped() {
        let whose = Whose::Client { subject: "CN=x\nWARN forged".into() };
        let e = OutOfDate::check(whose, window(), T + 1).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("the client's certificate (CN=x\\nWARN forged) expired at"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }
}
