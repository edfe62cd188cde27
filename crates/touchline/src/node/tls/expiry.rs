//! When a certificate expires: its `notAfter`, read from the DER of an X.509 certificate (RFC 5280,
//! 4.1) by walking the few DER elements before it. Nothing else of the certificate is read or
//! checked here (rustls checks what it serves and what clients present); a file that is not a
//! well-formed certificate gives `None`, never a panic.

/// The certificate's validity period, `notBefore` and `notAfter`, as Unix seconds.
pub(super) fn validity(der: &[u8]) -> Option<(i64, i64)> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let (certificate, _) = element(der, SEQUENCE)?;
    let (mut tbs, _) = element(certificate, SEQUENCE)?;
    // TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer,
    // validity, ... }
    if tbs.first() == Some(&VERSION) {
        tbs = element(tbs, VERSION)?.1;
    }
    for tag in [INTEGER, SEQUENCE, SEQUENCE] {
        tbs = element(tbs, tag)?.1;
    }
    let (validity, _) = element(tbs, SEQUENCE)?;
    let (not_before, rest) = time(validity)?;
    let (not_after, _) = time(rest)?;
    Some((not_before, not_after))
}

/// The earliest `notAfter` of `certificates` (Unix seconds): when the first of them expires.
/// `None` when there are none, or when one is not a certificate whose validity can be read.
pub(super) fn earliest<'a>(certificates: impl IntoIterator<Item = &'a [u8]>) -> Option<i64> {
    certificates
        .into_iter()
        .map(|der| validity(der).map(|(_, not_after)| not_after))
        .try_fold(None, |earliest: Option<i64>, not_after| {
            not_after.map(|not_after| Some(earliest.map_or(not_after, |e| e.min(not_after))))
        })?
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
/// `[0] EXPLICIT`, the version's tag.
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The content of the DER element at the start of `input`, which must have tag `tag`, and what
/// follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        // The long form: 1 to 4 bytes of length (DER has no indefinite length, 0x80).
        0x81..=0x84 => {
            let bytes = usize::from(first & 0x7f);
            let (length, rest) = rest.split_at_checked(bytes)?;
            let length = length
                .iter()
                .fold(0_usize, |length, byte| (length << 8) | usize::from(*byte));
            (length, rest)
        }
        _ => return None,
    };
    rest.split_at_checked(length)
}

/// A `Time` (UTCTime or GeneralizedTime, both in UTC with seconds, as RFC 5280 requires) as Unix
/// seconds, and what follows it.
fn time(input: &[u8]) -> Option<(i64, &[u8])> {
    let tag = *input.first()?;
    let (text, rest) = element(input, tag)?;
    let (year, text) = match (tag, text.len()) {
        // YYMMDDHHMMSSZ: 50-99 are 1950-1999, 00-49 are 2000-2049 (RFC 5280, 4.1.2.5.1).
        (UTC_TIME, 13) => {
            let year = digits(&text[..2])?;
            (if year >= 50 { 1900 } else { 2000 } + year, &text[2..])
        }
        // YYYYMMDDHHMMSSZ.
        (GENERALIZED_TIME, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if text.last() != Some(&b'Z') {
        return None;
    }
    let [month, day, hour, minute, second] =
        [0, 2, 4, 6, 8].map(|at| text.get(at..at + 2).and_then(digits));
    let (month, day) = (month?, day?);
    let (hour, minute, second) = (hour?, minute?, second?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // Up to 60 seconds: a leap second.
    if second > 60 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second;
    Some((seconds, rest))
}

/// A number written in ASCII digits only.
fn digits(text: &[u8]) -> Option<i64> {
    text.iter().try_fold(0_i64, |number, byte| {
        byte.is_ascii_digit()
            .then(|| number * 10 + i64::from(byte - b'0'))
    })
}

/// Days from 1970-01-01 to the date (proleptic Gregorian calendar; H. Hinnant's
/// `days_from_civil`). `year` has at most four digits here, so nothing overflows.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;

    use super::*;

    fn fixture(name: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(super::super::tests::fixture(name))
            .and_then(Iterator::collect)
            .unwrap_or_default()
    }

    #[test]
    fn the_validity_of_the_fixtures_is_read() {
        let server = fixture("server.pem");
        assert_eq!(server.len(), 1);
        // `openssl x509 -noout -dates`: notBefore=Nov 26 03:26:55 2026 GMT (a UTCTime),
        // notAfter=Nov  2 03:26:55 2126 GMT (a GeneralizedTime, past 2049).
        assert_eq!(validity(&server[0]), Some((1_795_663_615, 4_949_263_615)));
        let ca = fixture("ca.pem");
        assert_eq!(
            earliest(ca.iter().map(|der| der.as_ref())),
            Some(4_949_263_614)
        );
        // The earliest of several.
        let both = [&ca[0], &server[0]];
        assert_eq!(
            earliest(both.iter().map(|der| der.as_ref())),
            Some(4_949_263_614)
        );
    }

    #[test]
    fn the_epoch_and_the_calendar_are_right() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        // UTCTime years: 49 is 2049, 50 is 1950.
        let utc = |text: &[u8]| {
            let mut der = vec![UTC_TIME, u8::try_from(text.len()).unwrap_or(0)];
            der.extend_from_slice(text);
            time(&der).map(|(seconds, _)| seconds)
        };
        assert_eq!(utc(b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(utc(b"500101000000Z"), Some(-631_152_000));
        assert_eq!(utc(b"700101000000Z"), Some(0));
        // Not UTC, no seconds, not digits, out of range.
        for bad in [
            &b"700101000000+"[..],
            b"7001010000Z",
            b"70010100000aZ",
            b"701301000000Z",
            b"700100000000Z",
            b"700101240000Z",
        ] {
            assert_eq!(utc(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn what_is_not_a_certificate_has_no_validity_and_panics_nothing() {
        let server = fixture("server.pem");
        let der: &[u8] = &server[0];
        // Every truncation, and every single byte changed, of a real certificate.
        for end in 0..der.len() {
            assert_eq!(validity(&der[..end]), None);
        }
        for at in 0..der.len() {
            for byte in [0x00, 0x80, 0x84, 0xff] {
                let mut changed = der.to_vec();
                changed[at] = byte;
                let _ = validity(&changed);
            }
        }
        assert_eq!(validity(b""), None);
        assert_eq!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(earliest(std::iter::empty()), None);
        assert_eq!(earliest([der, b"not a certificate"]), None);
    }
}
