//! Every size limit an event and its parts are held to. Each is checked by
//! [`crate::Event::validate`] on every event a node writes or receives, so a value over a
//! limit is refused with a clear error before anything is stored or forwarded.

/// Longest key, in bytes of UTF-8. 512 keeps key-index entries small while fitting any
/// path-like record name (`todos/42`, `users/<uuid>/settings`).
pub const MAX_KEY_BYTES: usize = 512;

/// Largest payload (the CBOR-encoded value), in bytes. 64 KiB: events are records, not
/// blobs, and a gossip message must hold at least one whole event.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// Longest `kind` (the application's event type name), in bytes.
pub const MAX_KIND_BYTES: usize = 128;

/// Most entries in `meta`, and the largest total size of its keys and values.
pub const MAX_META_ENTRIES: usize = 64;
/// See [`MAX_META_ENTRIES`].
pub const MAX_META_BYTES: usize = 4 * 1024;

/// Most entries in an event's vector clock: the number of distinct writers a space can
/// have. Bounds the clock's size on the wire and the work of comparing two clocks.
pub const MAX_CLOCK_ENTRIES: usize = 1024;

/// Largest encoded event. Payload, meta and a full clock (1024 entries of ~45 bytes)
/// fit with room to spare.
pub const MAX_EVENT_BYTES: usize = 128 * 1024;

/// Longest run of an origin's consecutive unsigned events (see [`crate::Event::sig`]).
/// A writer signs at least every this many events, so a pull page that must end on a
/// signed event of each origin overshoots its size limit by at most this much.
pub const MAX_UNSIGNED_RUN: usize = 256;
