//! The CBOR subset of canonical events, written and read by hand.
//!
//! Unsigned integers, byte and text strings, arrays and maps of definite length, and
//! `null`, every head in its shortest form: exactly what ciborium writes for these
//! items. [`Writer`] writes them, so that [`crate::Event::encode`] produces the very
//! bytes the event's serde implementation produces through ciborium, without serde's
//! per-item cost.
//!
//! [`Reader`] reads that form and nothing else. It is the fast path of
//! [`crate::Event::decode`]: on anything else, malformed or merely written differently
//! (a longer head, an indefinite length, a tag, `undefined` for `null`), it returns
//! `None` and the caller falls back to ciborium, which decides what such input means.
//! So the reader never has to reproduce ciborium's leniency or its error messages, only
//! to recognise what ciborium's writer produces.

pub(crate) const UINT: u8 = 0;
pub(crate) const BYTES: u8 = 2;
pub(crate) const TEXT: u8 = 3;
pub(crate) const ARRAY: u8 = 4;
pub(crate) const MAP: u8 = 5;
pub(crate) const NULL: u8 = 0xf6;

/// The largest head: an initial byte and an 8-byte argument.
pub(crate) const MAX_HEAD_LEN: usize = 9;

/// The size of the shortest head with argument `n`.
pub(crate) fn head_len(n: u64) -> usize {
    match n {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => MAX_HEAD_LEN,
    }
}

/// Appends items in their shortest form to a vector.
///
/// Every method is inlined into its caller and appends a fixed-size array per head, so
/// that writing an event compiles to a run of stores rather than calls.
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }

    /// The shortest head of major type `major` with argument `n`.
    #[inline(always)]
    fn head(&mut self, major: u8, n: u64) {
        let m = major << 5;
        if n < 24 {
            self.out.push(m | n as u8);
        } else if n <= 0xff {
            self.out.extend_from_slice(&[m | 24, n as u8]);
        } else if n <= 0xffff {
            let [a, b] = (n as u16).to_be_bytes();
            self.out.extend_from_slice(&[m | 25, a, b]);
        } else if n <= 0xffff_ffff {
            let [a, b, c, d] = (n as u32).to_be_bytes();
            self.out.extend_from_slice(&[m | 26, a, b, c, d]);
        } else {
            let [a, b, c, d, e, f, g, h] = n.to_be_bytes();
            self.out
                .extend_from_slice(&[m | 27, a, b, c, d, e, f, g, h]);
        }
    }

    #[inline(always)]
    pub(crate) fn uint(&mut self, n: u64) {
        self.head(UINT, n);
    }

    #[inline(always)]
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.head(BYTES, b.len() as u64);
        self.out.extend_from_slice(b);
    }

    #[inline(always)]
    pub(crate) fn text(&mut self, s: &str) {
        self.head(TEXT, s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    /// The head of an array of `len` items, which the caller writes next.
    #[inline(always)]
    pub(crate) fn array(&mut self, len: usize) {
        self.head(ARRAY, len as u64);
    }

    /// The head of a map of `len` entries, whose keys and values the caller writes next.
    #[inline(always)]
    pub(crate) fn map(&mut self, len: usize) {
        self.head(MAP, len as u64);
    }

    #[inline(always)]
    pub(crate) fn null(&mut self) {
        self.out.push(NULL);
    }
}

/// Reads the subset above, in shortest form only, from a byte slice. Every method
/// returns `None` on input it does not recognise, including the end of the input; every
/// length is checked against the bytes left before it is used, so no input makes it
/// read out of bounds or allocate.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn take_array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// The argument of a head of major type `major`, which must be in shortest form.
    fn head(&mut self, major: u8) -> Option<u64> {
        let initial = *self.buf.first()?;
        self.buf = &self.buf[1..];
        if initial >> 5 != major {
            return None;
        }
        let (n, min) = match initial & 0x1f {
            n @ 0..=23 => return Some(u64::from(n)),
            24 => (u64::from(self.take_array::<1>()?[0]), 24),
            25 => (u64::from(u16::from_be_bytes(self.take_array()?)), 0x100),
            26 => (u64::from(u32::from_be_bytes(self.take_array()?)), 0x1_0000),
            27 => (u64::from_be_bytes(self.take_array()?), 0x1_0000_0000),
            _ => return None,
        };
        (n >= min).then_some(n)
    }

    pub(crate) fn uint(&mut self) -> Option<u64> {
        self.head(UINT)
    }

    pub(crate) fn array(&mut self) -> Option<u64> {
        self.head(ARRAY)
    }

    pub(crate) fn map(&mut self) -> Option<u64> {
        self.head(MAP)
    }

    pub(crate) fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.head(BYTES)?;
        self.take(usize::try_from(n).ok()?)
    }

    /// A byte string of exactly `N` bytes.
    pub(crate) fn fixed_bytes<const N: usize>(&mut self) -> Option<&'a [u8; N]> {
        self.bytes()?.try_into().ok()
    }

    /// A text string; `None` also when it is not UTF-8.
    pub(crate) fn text(&mut self) -> Option<&'a str> {
        let n = self.head(TEXT)?;
        std::str::from_utf8(self.take(usize::try_from(n).ok()?)?).ok()
    }

    /// Consumes a `null` if one is next.
    pub(crate) fn null(&mut self) -> bool {
        if self.buf.first() == Some(&NULL) {
            self.buf = &self.buf[1..];
            true
        } else {
            false
        }
    }
}

/// Arguments at and around every boundary between head sizes, for tests of the codecs
/// built on these heads.
#[cfg(test)]
pub(crate) const BOUNDARIES: [u64; 11] = [
    0,
    1,
    23,
    24,
    255,
    256,
    65_535,
    65_536,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    u64::MAX,
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ciborium<T: serde::Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    fn written(write: impl FnOnce(&mut Writer<'_>)) -> Vec<u8> {
        let mut out = Vec::new();
        write(&mut Writer::new(&mut out));
        out
    }

    #[test]
    fn heads_are_the_shortest_form_ciborium_writes_and_read_back() {
        for n in BOUNDARIES {
            let out = written(|w| w.uint(n));
            assert_eq!(out, ciborium(&n), "{n}");
            assert_eq!(out.len(), head_len(n));
            let mut r = Reader::new(&out);
            assert_eq!(r.uint(), Some(n));
            assert!(r.is_empty());
        }
    }

    #[test]
    fn strings_and_collections_are_written_as_ciborium_writes_them() {
        for len in [0usize, 1, 23, 24, 255, 256, 65_535, 65_536] {
            let b = vec![b'x'; len];
            let out = written(|w| w.bytes(&b));
            assert_eq!(out, ciborium(&serde_bytes::Bytes::new(&b)), "bytes {len}");
            assert_eq!(out.len(), head_len(len as u64) + len);
            assert_eq!(Reader::new(&out).bytes(), Some(b.as_slice()));

            let s = String::from_utf8(b).unwrap();
            let out = written(|w| w.text(&s));
            assert_eq!(out, ciborium(&s), "text {len}");
            assert_eq!(Reader::new(&out).text(), Some(s.as_str()));

            let out = written(|w| w.array(len));
            assert_eq!(Reader::new(&out).array(), Some(len as u64));
            let out = written(|w| w.map(len));
            assert_eq!(Reader::new(&out).map(), Some(len as u64));
        }
        let items = (
            vec![1u64, 24],
            [("a", "b")].into_iter().collect::<BTreeMap<_, _>>(),
            (),
        );
        let out = written(|w| {
            w.array(3);
            w.array(2);
            w.uint(1);
            w.uint(24);
            w.map(1);
            w.text("a");
            w.text("b");
            w.null();
        });
        assert_eq!(out, ciborium(&items));
    }

    #[test]
    fn longer_heads_than_needed_are_not_recognised() {
        // Each value written one size up from its shortest head.
        for bytes in [
            &[0x18, 0x17][..],
            &[0x19, 0x00, 0xff],
            &[0x1a, 0x00, 0x00, 0xff, 0xff],
            &[0x1b, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff],
        ] {
            let value: u64 = ciborium::from_reader(bytes).unwrap();
            assert!(
                Reader::new(bytes).uint().is_none(),
                "{value} in {bytes:02x?}"
            );
        }
    }

    #[test]
    fn other_forms_and_short_input_are_not_recognised() {
        assert!(Reader::new(&[]).uint().is_none());
        assert!(
            Reader::new(&[0x19, 0x01]).uint().is_none(),
            "truncated head"
        );
        assert!(Reader::new(&[0x1c]).uint().is_none(), "reserved minor");
        assert!(Reader::new(&[0x20]).uint().is_none(), "negative integer");
        assert!(
            Reader::new(&[0x5f, 0x41, 0x00, 0xff]).bytes().is_none(),
            "indefinite"
        );
        assert!(Reader::new(&[0xc2, 0x41, 0x00]).bytes().is_none(), "tagged");
        assert!(
            Reader::new(&[0x43, 0x00, 0x00]).bytes().is_none(),
            "truncated"
        );
        assert!(
            Reader::new(&[0x62, 0xc3, 0x28]).text().is_none(),
            "not UTF-8"
        );
        assert!(Reader::new(&[0x41, 0x00]).fixed_bytes::<2>().is_none());
        let mut r = Reader::new(&[0xf7]);
        assert!(!r.null(), "undefined is not null");
        assert!(!r.is_empty());
    }
}
