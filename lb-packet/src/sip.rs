//! SIP Call-ID extraction (RFC 3261 §20.8): the layer-5 key that keeps every message of a call
//! on one backend (session integrity for UDP SIP).
//!
//! Accepted: the full `Call-ID` and compact `i` header names in any case (RFC 3261 §7.3.1,
//! §7.3.3), whitespace around the colon and the value, a value that starts on a continuation
//! (folded) line, CRLF or bare LF line ends. Only the first occurrence in the header section
//! counts; the body is never read. Work is bounded by [`SCAN_LIMIT`] bytes whatever the payload.

/// The most payload bytes examined.
pub const SCAN_LIMIT: usize = 8192;

#[inline]
fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// The line starting at `i` (without its CR LF / LF) and the start of the next line.
#[inline]
fn line(buf: &[u8], i: usize) -> (&[u8], usize) {
    let rest = buf.get(i..).unwrap_or(&[]);
    match memchr::memchr(b'\n', rest) {
        Some(n) => {
            let l = &rest[..n];
            (l.strip_suffix(b"\r").unwrap_or(l), i + n + 1)
        }
        None => (rest.strip_suffix(b"\r").unwrap_or(rest), buf.len()),
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if is_ws(*first) || *first == b'\r' || *first == b'\n' {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if is_ws(*last) || *last == b'\r' || *last == b'\n' {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// Whether `l` is a SIP request line (`METHOD uri SIP/2.0`) or status line (`SIP/2.0 code
/// reason`).
fn is_start_line(l: &[u8]) -> bool {
    let v = b"SIP/2.0";
    (l.len() > v.len()
        && l.get(..v.len()).is_some_and(|p| p.eq_ignore_ascii_case(v))
        && l.get(v.len()) == Some(&b' '))
        || (l.len() > v.len() + 1
            && l.get(l.len() - v.len()..)
                .is_some_and(|s| s.eq_ignore_ascii_case(v))
            && l.get(l.len() - v.len() - 1) == Some(&b' '))
}

/// The Call-ID of the SIP message in the UDP payload `payload`, trimmed of surrounding
/// whitespace, or `None` if the payload is not a SIP message (no `SIP/2.0` start line), has no
/// Call-ID in its header section within [`SCAN_LIMIT`] bytes, or has an empty one.
///
/// A value that is itself folded across lines is returned as its raw span, fold bytes included
/// (use [`fold_into`] to collapse them).
///
/// ```
/// let msg = b"INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP pc33\r\ni:  a84b4c76e66710@pc33 \r\n\r\nbody";
/// assert_eq!(lb_packet::sip::call_id(msg), Some(&b"a84b4c76e66710@pc33"[..]));
/// ```
pub fn call_id(payload: &[u8]) -> Option<&[u8]> {
    let buf = payload.get(..SCAN_LIMIT).unwrap_or(payload);
    let (start, mut i) = line(buf, 0);
    if !is_start_line(start) {
        return None;
    }
    while i < buf.len() {
        let (l, next) = line(buf, i);
        if l.is_empty() {
            return None; // end of the header section
        }
        // Only a line whose name starts with `c` or `i` can be the Call-ID (no header name
        // starts with whitespace: such a line continues another header).
        if !matches!(l.first(), Some(b'c' | b'C' | b'i' | b'I')) {
            i = next;
            continue;
        }
        let Some(colon) = memchr::memchr(b':', l) else {
            i = next;
            continue;
        };
        let name = trim(&l[..colon]);
        if name.eq_ignore_ascii_case(b"call-id") || name.eq_ignore_ascii_case(b"i") {
            // The value: rest of this line plus continuation lines.
            let vstart = i + colon + 1;
            let mut vend = next;
            while vend < buf.len() && buf.get(vend).is_some_and(|&b| is_ws(b)) {
                vend = line(buf, vend).1;
            }
            let v = trim(buf.get(vstart..vend).unwrap_or(&[]));
            return if v.is_empty() { None } else { Some(v) };
        }
        i = next;
    }
    None
}

/// Copies `value` into `out` with every run of linear whitespace (spaces, tabs, line folds)
/// replaced by one space (RFC 3261 §7.3.1: folding is equivalent to a single SP). Returns the
/// written part, or `None` if `out` is too small.
pub fn fold_into<'a>(value: &[u8], out: &'a mut [u8]) -> Option<&'a [u8]> {
    let mut n = 0;
    let mut in_ws = false;
    for &b in value {
        let ws = is_ws(b) || b == b'\r' || b == b'\n';
        if ws {
            in_ws = true;
            continue;
        }
        if in_ws && n > 0 {
            *out.get_mut(n)? = b' ';
            n += 1;
        }
        in_ws = false;
        *out.get_mut(n)? = b;
        n += 1;
    }
    out.get(..n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RFC3261_INVITE: &[u8] = b"INVITE sip:bob@biloxi.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.com>\r\n\
From: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.com>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 142\r\n\r\n\
v=0\r\nCall-ID: not-this-one\r\n";

    #[test]
    fn rfc3261_example() {
        // RFC 3261 §4, the INVITE F1.
        assert_eq!(
            call_id(RFC3261_INVITE),
            Some(&b"a84b4c76e66710@pc33.atlanta.com"[..])
        );
    }

    #[test]
    fn forms() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"SIP/2.0 200 OK\r\ncall-id:x@y\r\n\r\n", Some(b"x@y")),
            (b"SIP/2.0 200 OK\nI : \t x@y \t\n\n", Some(b"x@y")),
            (
                b"BYE sip:a SIP/2.0\r\nCALL-ID:\r\n   folded@host\r\n\r\n",
                Some(b"folded@host"),
            ),
            (
                b"BYE sip:a SIP/2.0\r\nCall-ID: a\r\n b\r\nTo: x\r\n\r\n",
                Some(b"a\r\n b"),
            ),
            (
                b"BYE sip:a SIP/2.0\r\nCall-ID: first\r\ni: second\r\n\r\n",
                Some(b"first"),
            ),
            (
                b"BYE sip:a SIP/2.0\r\nX-Call-ID: no\r\nVia: x\r\n i: no\r\n\r\nCall-ID: body\r\n",
                None,
            ),
            (b"BYE sip:a SIP/2.0\r\nCall-ID:   \r\n\r\n", None),
            (b"HTTP/1.1 200 OK\r\nCall-ID: x\r\n\r\n", None),
            (b"", None),
            (b"\x00\x01\x02\n\n", None),
        ];
        for (msg, want) in cases {
            assert_eq!(call_id(msg), *want, "{}", String::from_utf8_lossy(msg));
        }
    }

    #[test]
    fn fold_collapses() {
        let mut out = [0u8; 16];
        assert_eq!(fold_into(b"a\r\n b\t c", &mut out), Some(&b"a b c"[..]));
        assert_eq!(fold_into(b"abc", &mut [0u8; 2]), None);
    }

    #[test]
    fn bounded_on_huge_payloads() {
        let mut msg = b"INVITE sip:a SIP/2.0\r\n".to_vec();
        msg.extend(std::iter::repeat_n(b"X-Pad: 0123456789\r\n".iter().copied(), 1000).flatten());
        msg.extend_from_slice(b"Call-ID: late\r\n\r\n");
        assert!(msg.len() > SCAN_LIMIT);
        assert_eq!(call_id(&msg), None);
    }

    proptest! {
        #[test]
        fn finds_generated_call_ids(
            id in "[A-Za-z0-9@.+-]{1,40}",
            compact: bool,
            upper: bool,
            pad in "[ \t]{0,3}",
            fold: bool,
            before in proptest::collection::vec("[A-Za-z-]{1,10}: [a-z0-9 ;=]{0,20}", 0..5),
        ) {
            let mut m = String::from("OPTIONS sip:x@y SIP/2.0\r\n");
            for h in &before {
                if h.to_ascii_lowercase().starts_with("call-id") || h.to_ascii_lowercase().starts_with("i:") { continue; }
                m.push_str(h);
                m.push_str("\r\n");
            }
            let name = if compact { "i" } else { "Call-ID" };
            let name = if upper { name.to_ascii_uppercase() } else { name.to_ascii_lowercase() };
            m.push_str(&name);
            m.push(':');
            m.push_str(&pad);
            if fold { m.push_str("\r\n "); }
            m.push_str(&id);
            m.push_str(&pad);
            m.push_str("\r\nCall-ID: other\r\n\r\n");
            prop_assert_eq!(call_id(m.as_bytes()), Some(id.as_bytes()));
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut m = b"ACK sip:x SIP/2.0\r\n".to_vec();
            m.extend_from_slice(&b);
            if let Some(v) = call_id(&m) {
                prop_assert!(!v.is_empty());
            }
            let _ = call_id(&b);
        }
    }
}
