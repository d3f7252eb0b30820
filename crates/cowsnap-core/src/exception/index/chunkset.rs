//! [`ChunkSet`]: a compact set of chunk numbers, in the spirit of roaring bitmaps.
//!
//! The exception index must answer "is origin chunk `c` remapped?" or "is COW chunk `c` in
//! use?" for devices of billions of chunks, with memory that follows the members rather
//! than the device size, whether they are scattered or packed. A `BTreeSet<u64>` costs tens
//! of bytes per member and a flat bitmap one bit per chunk of the device; this set costs
//! about two bytes per member where members are scattered and one bit per chunk where they
//! are packed.
//!
//! # Layout
//!
//! A chunk `c` lives in the *container* of key `c >> 16`, which covers 2^16 consecutive
//! chunks, as the 16-bit member `c & 0xFFFF`. Containers are kept in a vector sorted by
//! key (binary search); an empty container is dropped. A container is either
//! * *sparse*: a sorted list of distinct `u16` members, while it holds at most
//!   [`SPARSE_MAX`] (4096) of them, two bytes each; or
//! * *dense*: a bitmap of 1024 `u64` words (8 KiB), once a 4097th member is inserted.
//!
//! A dense container turns sparse again only when it falls below [`DENSE_MIN`] (2048)
//! members: the gap between the two thresholds stops a container that hovers around one of
//! them from converting back and forth on every insert and remove. So two equal sets may
//! differ in representation; [`PartialEq`] compares members, not representations.
//!
//! # Encoding, version 1
//!
//! All integers are little-endian.
//!
//! | size           | field                                                       |
//! |----------------|-------------------------------------------------------------|
//! | 4              | magic `b"CXCS"`                                             |
//! | 4              | `u32` version, 1                                            |
//! | 8              | `u64` number of members of the whole set                    |
//! | 4              | `u32` number of containers                                  |
//! | per container: |                                                             |
//! | 8              | `u64` key (`chunk >> 16`), strictly increasing, < 2^48      |
//! | 1              | `u8` kind: 0 sparse, 1 dense                                |
//! | 4              | `u32` members in this container                             |
//! | 2 × members    | sparse: the `u16` members, strictly increasing, 1 to 4096   |
//! | 8192           | dense: 1024 `u64` words, bit `m % 64` of word `m / 64` set for member `m`; 1 to 65536 bits set, as many as stated |
//!
//! The members of all containers add up to the set's count, and nothing follows the last
//! container. [`ChunkSet::decode`] checks all of that and never panics: the encoding may
//! come from a damaged disk. A dense container of fewer than [`DENSE_MIN`] members is
//! accepted and kept sparse. The format has no checksum: a corruption that keeps every rule
//! (a sparse member changed to another value that keeps the order) decodes to another set.

use std::fmt;

/// First bytes of an encoded set.
const MAGIC: &[u8; 4] = b"CXCS";
/// The one version of the encoding this module writes and reads.
const VERSION: u32 = 1;
/// Most members a sparse container holds; inserting one more turns it dense.
pub const SPARSE_MAX: usize = 4096;
/// A dense container that falls below this many members turns sparse again.
pub const DENSE_MIN: u32 = 2048;
/// Words of a dense container's bitmap: 2^16 bits.
const WORDS: usize = 1024;
/// Members a dense container can hold: every chunk of its range.
const DENSE_MAX: u32 = 1 << 16;
/// The largest key: that of chunk `u64::MAX`.
const MAX_KEY: u64 = u64::MAX >> 16;
/// Encoded kind of a sparse container.
const KIND_SPARSE: u8 = 0;
/// Encoded kind of a dense container.
const KIND_DENSE: u8 = 1;
/// Bytes of the encoding before the first container.
const HEADER_BYTES: usize = 4 + 4 + 8 + 4;
/// Bytes of a container's key, kind and count.
const CONTAINER_HEADER_BYTES: usize = 8 + 1 + 4;
/// Fewest bytes an encoded container takes (a sparse one of one member); bounds the
/// vector `decode` reserves from a count it has not verified yet.
const MIN_CONTAINER_BYTES: usize = CONTAINER_HEADER_BYTES + 2;
/// Members shown by `Debug` before it elides the rest.
const DEBUG_MEMBERS: usize = 32;

/// The low 16 bits of `x`.
#[allow(
    clippy::cast_possible_truncation,
    reason = "masked to 16 bits first: the cast loses nothing"
)]
fn low16(x: u64) -> u16 {
    (x & 0xFFFF) as u16
}

/// The container key and the member within that container of chunk `c`.
fn split(c: u64) -> (u64, u16) {
    (c >> 16, low16(c))
}

/// The word index and the bit mask of member `m` in a dense bitmap.
fn bit_of(m: u16) -> (usize, u64) {
    (usize::from(m >> 6), 1u64 << (m & 63))
}

/// `n` as a `u32`, for counts that the invariants keep far below 2^32.
fn count_u32(n: usize, what: &str) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| panic!("{what}: {n} does not fit the u32 of the format"))
}

/// The members of 2^16 consecutive chunks.
#[derive(Clone)]
enum Container {
    /// Sorted, distinct members; at most [`SPARSE_MAX`] of them, never none.
    Sparse(Vec<u16>),
    /// A bitmap and its number of set bits, never below [`DENSE_MIN`].
    Dense { bits: Box<[u64; WORDS]>, count: u32 },
}

impl Container {
    /// Members held.
    fn len(&self) -> u32 {
        match self {
            Container::Sparse(v) => count_u32(v.len(), "sparse container"),
            Container::Dense { count, .. } => *count,
        }
    }

    fn contains(&self, m: u16) -> bool {
        match self {
            Container::Sparse(v) => v.binary_search(&m).is_ok(),
            Container::Dense { bits, .. } => {
                let (w, mask) = bit_of(m);
                bits[w] & mask != 0
            }
        }
    }

    /// Adds `m`; true when it was absent. A full sparse container turns dense first.
    fn insert(&mut self, m: u16) -> bool {
        match self {
            Container::Sparse(v) => match v.binary_search(&m) {
                Ok(_) => return false,
                Err(pos) if v.len() < SPARSE_MAX => {
                    v.insert(pos, m);
                    return true;
                }
                // Full: converted below, before the list would grow past 8 KiB.
                Err(_) => {}
            },
            Container::Dense { bits, count } => {
                let (w, mask) = bit_of(m);
                if bits[w] & mask != 0 {
                    return false;
                }
                bits[w] |= mask;
                *count += 1;
                return true;
            }
        }
        *self = self.to_dense();
        self.insert(m)
    }

    /// Adds the strictly increasing `members`; returns the first already present (the
    /// members after it are not added).
    fn merge_sorted(&mut self, members: &[u16]) -> Option<u16> {
        if let Container::Sparse(v) = self {
            if v.len() + members.len() <= SPARSE_MAX {
                let mut out = Vec::with_capacity(v.len() + members.len());
                let (mut a, mut b) = (v.iter().peekable(), members.iter().peekable());
                let mut dup = None;
                loop {
                    match (a.peek(), b.peek()) {
                        (Some(&&x), Some(&&y)) if x == y => {
                            dup = Some(y);
                            break;
                        }
                        (Some(&&x), Some(&&y)) if x < y => {
                            out.push(x);
                            a.next();
                        }
                        (_, Some(&&y)) => {
                            out.push(y);
                            b.next();
                        }
                        (Some(&&x), None) => {
                            out.push(x);
                            a.next();
                        }
                        (None, None) => break,
                    }
                }
                if dup.is_some() {
                    // Keep what was merged before the duplicate, and the rest of the list.
                    out.extend(a.copied());
                    out.sort_unstable();
                    out.dedup();
                }
                *v = out;
                return dup;
            }
            *self = self.to_dense();
        }
        members.iter().find(|&&m| !self.insert(m)).copied()
    }

    /// Removes `m`; true when it was present. A dense container that falls below
    /// [`DENSE_MIN`] turns sparse.
    fn remove(&mut self, m: u16) -> bool {
        match self {
            Container::Sparse(v) => {
                let Ok(pos) = v.binary_search(&m) else {
                    return false;
                };
                v.remove(pos);
                // Give memory back once the list uses a quarter of it (amortised: the
                // next shrink needs the length to halve again).
                if v.capacity() > 16 && v.len() * 4 < v.capacity() {
                    v.shrink_to(v.len() * 2);
                }
                true
            }
            Container::Dense { bits, count } => {
                let (w, mask) = bit_of(m);
                if bits[w] & mask == 0 {
                    return false;
                }
                bits[w] &= !mask;
                *count -= 1;
                if *count < DENSE_MIN {
                    let list = dense_members(bits, *count);
                    *self = Container::Sparse(list);
                }
                true
            }
        }
    }

    /// The same members as a bitmap.
    fn to_dense(&self) -> Container {
        match self {
            Container::Sparse(v) => {
                let mut bits = Box::new([0u64; WORDS]);
                for &m in v {
                    let (w, mask) = bit_of(m);
                    bits[w] |= mask;
                }
                Container::Dense {
                    bits,
                    count: count_u32(v.len(), "sparse container"),
                }
            }
            Container::Dense { .. } => self.clone(),
        }
    }

    /// Bytes of heap this container holds.
    fn heap_bytes(&self) -> usize {
        match self {
            Container::Sparse(v) => v.capacity() * std::mem::size_of::<u16>(),
            Container::Dense { .. } => std::mem::size_of::<[u64; WORDS]>(),
        }
    }

    /// The members, ascending.
    fn iter(&self) -> Members<'_> {
        match self {
            Container::Sparse(v) => Members::Sparse(v.iter()),
            Container::Dense { bits, .. } => Members::Dense(BitIter::new(bits)),
        }
    }
}

/// The members of a bitmap as a sorted list of exactly `count` capacity.
fn dense_members(bits: &[u64; WORDS], count: u32) -> Vec<u16> {
    let mut list = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    list.extend(BitIter::new(bits));
    list
}

/// Iterator over the members of one container.
enum Members<'a> {
    Sparse(std::slice::Iter<'a, u16>),
    Dense(BitIter<'a>),
}

impl Iterator for Members<'_> {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        match self {
            Members::Sparse(it) => it.next().copied(),
            Members::Dense(it) => it.next(),
        }
    }
}

/// Iterator over the set bits of a bitmap, lowest first.
struct BitIter<'a> {
    /// The words not loaded yet.
    words: &'a [u64],
    /// The bits of the current word not returned yet.
    cur: u64,
    /// Bit number of bit 0 of the current word.
    cur_base: u64,
    /// Bit number of bit 0 of the next word to load.
    next_base: u64,
}

impl<'a> BitIter<'a> {
    fn new(bits: &'a [u64; WORDS]) -> Self {
        BitIter {
            words: &bits[..],
            cur: 0,
            cur_base: 0,
            next_base: 0,
        }
    }
}

impl Iterator for BitIter<'_> {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        while self.cur == 0 {
            let (&w, rest) = self.words.split_first()?;
            self.words = rest;
            self.cur = w;
            self.cur_base = self.next_base;
            self.next_base += 64;
        }
        let bit = u64::from(self.cur.trailing_zeros());
        // Clear the lowest set bit.
        self.cur &= self.cur - 1;
        Some(low16(self.cur_base + bit))
    }
}

/// A set of `u64` chunk numbers, compact both when they are scattered and when they are
/// packed (see the module documentation for the layout).
#[derive(Clone, Default)]
pub struct ChunkSet {
    /// Containers sorted by key, none empty.
    containers: Vec<(u64, Container)>,
    /// Members of all containers.
    len: u64,
}

impl ChunkSet {
    /// An empty set; it holds no heap memory until the first insert.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the container of key `key` is, or would be inserted.
    fn find(&self, key: u64) -> Result<usize, usize> {
        self.containers.binary_search_by_key(&key, |(k, _)| *k)
    }

    /// Adds chunk `c`; true when it was not in the set yet.
    pub fn insert(&mut self, c: u64) -> bool {
        let (key, m) = split(c);
        // Chunks often come in increasing order (a COW's `new` chunks): the last container
        // first, without a search.
        let last = self.containers.len().checked_sub(1);
        let found = match last {
            Some(i) if self.containers[i].0 == key => Ok(i),
            Some(i) if self.containers[i].0 < key => Err(i + 1),
            _ => self.find(key),
        };
        let added = match found {
            Ok(i) => self.containers[i].1.insert(m),
            Err(i) => {
                self.containers.insert(i, (key, Container::Sparse(vec![m])));
                true
            }
        };
        if added {
            self.len += 1;
        }
        added
    }

    /// Adds `keys`, which must be strictly increasing, container by container: a merge
    /// of sorted lists (or bits set), linear in the members touched, where one
    /// [`insert`](Self::insert) each would shift a sorted list per key. Returns the first
    /// key already present (the keys after it are not added), or the first key that does
    /// not follow its predecessor.
    pub fn insert_sorted(&mut self, keys: &[u64]) -> Result<(), u64> {
        let mut rest = keys;
        let mut prev: Option<u64> = None;
        while let Some(&first) = rest.first() {
            let (key, _) = split(first);
            let n = rest.partition_point(|&c| split(c).0 == key);
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let mut members = Vec::with_capacity(group.len());
            for &c in group {
                if prev.is_some_and(|p| c <= p) {
                    return Err(c);
                }
                prev = Some(c);
                members.push(split(c).1);
            }
            let i = match self.find(key) {
                Ok(i) => i,
                Err(i) => {
                    self.containers
                        .insert(i, (key, Container::Sparse(Vec::new())));
                    i
                }
            };
            let container = &mut self.containers[i].1;
            let before = container.len();
            let dup = container.merge_sorted(&members);
            self.len += u64::from(container.len() - before);
            if container.len() == 0 {
                self.containers.remove(i);
            }
            if let Some(m) = dup {
                return Err((key << 16) | u64::from(m));
            }
        }
        Ok(())
    }

    /// True when chunk `c` is in the set.
    pub fn contains(&self, c: u64) -> bool {
        let (key, m) = split(c);
        self.find(key)
            .is_ok_and(|i| self.containers[i].1.contains(m))
    }

    /// Removes chunk `c`; true when it was in the set.
    pub fn remove(&mut self, c: u64) -> bool {
        let (key, m) = split(c);
        let Ok(i) = self.find(key) else {
            return false;
        };
        let container = &mut self.containers[i].1;
        if !container.remove(m) {
            return false;
        }
        if container.len() == 0 {
            self.containers.remove(i);
            // As for a sparse list: give memory back once a quarter of it is used.
            let n = self.containers.len();
            if self.containers.capacity() > 16 && n * 4 < self.containers.capacity() {
                self.containers.shrink_to(n * 2);
            }
        }
        self.len -= 1;
        true
    }

    /// Number of chunks in the set (a counter: O(1)).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the set holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of heap the set holds, from the capacities of its vectors and the size of its
    /// bitmaps (the allocator's own overhead is not counted).
    pub fn heap_bytes(&self) -> usize {
        self.containers.capacity() * std::mem::size_of::<(u64, Container)>()
            + self
                .containers
                .iter()
                .map(|(_, c)| c.heap_bytes())
                .sum::<usize>()
    }

    /// The chunks of the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.containers.iter().flat_map(|(key, c)| {
            let base = key << 16;
            c.iter().map(move |m| base | u64::from(m))
        })
    }

    /// The set in the version 1 encoding described in the module documentation.
    ///
    /// # Panics
    ///
    /// With 2^32 containers or more, which the `u32` count of the format cannot hold (such
    /// a set would take over 100 GiB of memory).
    pub fn encode(&self) -> Vec<u8> {
        let body: usize = self
            .containers
            .iter()
            .map(|(_, c)| {
                CONTAINER_HEADER_BYTES
                    + match c {
                        Container::Sparse(v) => v.len() * 2,
                        Container::Dense { .. } => WORDS * 8,
                    }
            })
            .sum();
        let mut out = Vec::with_capacity(HEADER_BYTES + body);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&count_u32(self.containers.len(), "containers").to_le_bytes());
        for (key, c) in &self.containers {
            out.extend_from_slice(&key.to_le_bytes());
            match c {
                Container::Sparse(v) => {
                    out.push(KIND_SPARSE);
                    out.extend_from_slice(&c.len().to_le_bytes());
                    for m in v {
                        out.extend_from_slice(&m.to_le_bytes());
                    }
                }
                Container::Dense { bits, count } => {
                    out.push(KIND_DENSE);
                    out.extend_from_slice(&count.to_le_bytes());
                    for w in bits.iter() {
                        out.extend_from_slice(&w.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    /// The set encoded in `buf` by [`ChunkSet::encode`].
    ///
    /// Checks every rule of the module documentation's format and never panics, whatever
    /// `buf` holds; it allocates no more than `buf` could describe. The error names the
    /// first rule broken and the byte offset of the offending field.
    pub fn decode(buf: &[u8]) -> Result<ChunkSet, String> {
        let mut r = Reader { buf, pos: 0 };
        let at = r.pos;
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(fail(
                at,
                format!("bad magic {magic:02x?}, expected \"CXCS\""),
            ));
        }
        let at = r.pos;
        let version = r.u32("version")?;
        if version != VERSION {
            return Err(fail(
                at,
                format!("unknown version {version}, expected {VERSION}"),
            ));
        }
        let len_at = r.pos;
        let len = r.u64("member count")?;
        let n = r.u32("container count")?;
        // A corrupt count must not reserve more than the rest of the buffer could hold.
        let cap = usize::try_from(n)
            .unwrap_or(usize::MAX)
            .min(r.remaining() / MIN_CONTAINER_BYTES);
        let mut containers: Vec<(u64, Container)> = Vec::with_capacity(cap);
        let mut total: u64 = 0;
        for _ in 0..n {
            let at = r.pos;
            let key = r.u64("container key")?;
            if key > MAX_KEY {
                return Err(fail(at, format!("container key {key} above 2^48 - 1")));
            }
            if let Some(&(prev, _)) = containers.last() {
                if key <= prev {
                    return Err(fail(
                        at,
                        format!("container key {key} not above the previous key {prev}"),
                    ));
                }
            }
            let kind_at = r.pos;
            let kind = r.u8("container kind")?;
            let count_at = r.pos;
            let count = r.u32("container member count")?;
            let container = match kind {
                KIND_SPARSE => decode_sparse(&mut r, count, count_at)?,
                KIND_DENSE => decode_dense(&mut r, count, count_at)?,
                other => {
                    return Err(fail(kind_at, format!("unknown container kind {other}")));
                }
            };
            total = total
                .checked_add(u64::from(count))
                .ok_or_else(|| fail(count_at, "member counts overflow a u64".to_owned()))?;
            containers.push((key, container));
        }
        if total != len {
            return Err(fail(
                len_at,
                format!("the set claims {len} members, its containers hold {total}"),
            ));
        }
        if r.remaining() != 0 {
            return Err(fail(
                r.pos,
                format!("{} trailing bytes after the last container", r.remaining()),
            ));
        }
        Ok(ChunkSet { containers, len })
    }
}

/// The members of a sparse container of `count` members (`count` read at `count_at`).
fn decode_sparse(r: &mut Reader<'_>, count: u32, count_at: usize) -> Result<Container, String> {
    let Some(n) = usize::try_from(count)
        .ok()
        .filter(|n| (1..=SPARSE_MAX).contains(n))
    else {
        return Err(fail(
            count_at,
            format!("sparse container of {count} members, expected 1 to {SPARSE_MAX}"),
        ));
    };
    // At most 4096 members: `n * 2` cannot overflow.
    let start = r.pos;
    let bytes = r.take(n * 2, "sparse members")?;
    let mut list = Vec::with_capacity(n);
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let m = u16::from_le_bytes([pair[0], pair[1]]);
        if let Some(&prev) = list.last() {
            if m <= prev {
                return Err(fail(
                    start + 2 * i,
                    format!("sparse member {m} not above the previous member {prev}"),
                ));
            }
        }
        list.push(m);
    }
    Ok(Container::Sparse(list))
}

/// The bitmap of a dense container of `count` members (`count` read at `count_at`); one
/// of fewer than [`DENSE_MIN`] members comes back sparse.
fn decode_dense(r: &mut Reader<'_>, count: u32, count_at: usize) -> Result<Container, String> {
    if count == 0 || count > DENSE_MAX {
        return Err(fail(
            count_at,
            format!("dense container of {count} members, expected 1 to {DENSE_MAX}"),
        ));
    }
    // The bytes are taken before the bitmap is allocated: a truncated buffer allocates
    // nothing.
    let bytes = r.take(WORDS * 8, "dense bitmap")?;
    let mut bits = Box::new([0u64; WORDS]);
    for (w, b) in bits.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(b);
        *w = u64::from_le_bytes(word);
    }
    // At most 1024 × 64 = 65536 bits: no overflow.
    let set: u32 = bits.iter().map(|w| w.count_ones()).sum();
    if set != count {
        return Err(fail(
            count_at,
            format!("dense container claims {count} members, its bitmap has {set}"),
        ));
    }
    if count < DENSE_MIN {
        return Ok(Container::Sparse(dense_members(&bits, count)));
    }
    Ok(Container::Dense { bits, count })
}

/// A decoding error at byte `at`.
fn fail(at: usize, what: String) -> String {
    format!("chunk set encoding: at byte {at}: {what}")
}

/// A cursor over the encoding that never reads past its end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Bytes not read yet.
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes, for field `what`.
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let slice = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or_else(|| {
                fail(
                    self.pos,
                    format!(
                        "truncated: {what} needs {n} bytes, {} left",
                        self.remaining()
                    ),
                )
            })?;
        self.pos += n;
        Ok(slice)
    }

    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let at = self.pos;
        let bytes = self.take(N, what)?;
        bytes
            .try_into()
            .map_err(|_| fail(at, format!("{what}: short read")))
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(u8::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

impl PartialEq for ChunkSet {
    /// Same members, whatever the representation of the containers.
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for ChunkSet {}

impl fmt::Debug for ChunkSet {
    /// The count, the number of containers and the first members (a set may hold
    /// billions).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// The first [`DEBUG_MEMBERS`] members of a set, as a set.
        struct First<'a>(&'a ChunkSet);
        impl fmt::Debug for First<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut s = f.debug_set();
                s.entries(self.0.iter().take(DEBUG_MEMBERS));
                if self.0.len > DEBUG_MEMBERS as u64 {
                    s.finish_non_exhaustive()
                } else {
                    s.finish()
                }
            }
        }
        f.debug_struct("ChunkSet")
            .field("len", &self.len)
            .field("containers", &self.containers.len())
            .field("members", &First(self))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    // A deterministic generator, so the measurements repeat.
    use crate::testkit::SplitMix;

    /// Checks every invariant of the representation.
    fn assert_invariants(s: &ChunkSet) {
        let mut total = 0u64;
        for pair in s.containers.windows(2) {
            assert!(pair[0].0 < pair[1].0, "keys not increasing");
        }
        for (key, c) in &s.containers {
            assert!(*key <= MAX_KEY);
            match c {
                Container::Sparse(v) => {
                    assert!(
                        !v.is_empty() && v.len() <= SPARSE_MAX,
                        "sparse of {}",
                        v.len()
                    );
                    assert!(v.windows(2).all(|p| p[0] < p[1]), "sparse not sorted");
                }
                Container::Dense { bits, count } => {
                    assert!(*count >= DENSE_MIN, "dense of {count}");
                    assert_eq!(bits.iter().map(|w| w.count_ones()).sum::<u32>(), *count);
                }
            }
            total += u64::from(c.len());
        }
        assert_eq!(total, s.len);
    }

    /// The kind of the container of chunk `c`: "sparse", "dense" or "none".
    fn kind_at(s: &ChunkSet, c: u64) -> &'static str {
        match s.find(c >> 16) {
            Ok(i) => match s.containers[i].1 {
                Container::Sparse(_) => "sparse",
                Container::Dense { .. } => "dense",
            },
            Err(_) => "none",
        }
    }

    fn encode_set(members: &[u64]) -> Vec<u8> {
        let mut s = ChunkSet::new();
        for &c in members {
            s.insert(c);
        }
        s.encode()
    }

    #[test]
    fn empty_set() {
        let s = ChunkSet::new();
        assert!(s.is_empty());
        assert_eq!(s.len(), 0);
        assert_eq!(s.heap_bytes(), 0);
        assert!(!s.contains(0));
        assert_eq!(s.iter().next(), None);
        assert_eq!(s, ChunkSet::default());
        assert_eq!(ChunkSet::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn insert_contains_remove() {
        let mut s = ChunkSet::new();
        assert!(s.insert(7));
        assert!(!s.insert(7));
        assert!(s.insert(1 << 16));
        assert!(s.contains(7));
        assert!(!s.contains(8));
        assert!(s.contains(1 << 16));
        assert_eq!(s.len(), 2);
        assert!(s.remove(7));
        assert!(!s.remove(7));
        assert!(!s.remove(12_345_678));
        assert_eq!(s.len(), 1);
        assert!(s.remove(1 << 16));
        assert!(s.is_empty());
        assert!(s.containers.is_empty(), "empty containers are dropped");
        assert_invariants(&s);
    }

    #[test]
    fn extreme_chunks() {
        let mut s = ChunkSet::new();
        let edges = [
            0,
            0xFFFF,
            0x1_0000,
            u64::MAX - 0xFFFF,
            u64::MAX - 1,
            u64::MAX,
        ];
        for c in edges {
            assert!(s.insert(c));
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), edges);
        for c in edges {
            assert!(s.contains(c));
        }
        assert!(!s.contains(u64::MAX - 2));
        assert_invariants(&s);
        assert_eq!(ChunkSet::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn a_container_turns_dense_past_4096_and_sparse_below_2048() {
        let base = 3u64 << 16;
        let members: Vec<u64> = (0..5000).map(|i| base + i * 13).collect();
        let mut s = ChunkSet::new();
        for (i, &c) in members.iter().enumerate() {
            assert!(s.insert(c));
            let want = if i < SPARSE_MAX { "sparse" } else { "dense" };
            assert_eq!(kind_at(&s, base), want, "after {} inserts", i + 1);
        }
        assert_eq!(s.len(), 5000);
        assert_invariants(&s);
        assert!(members.iter().all(|&c| s.contains(c)));
        assert!(!s.contains(base + 1));
        assert_eq!(s.iter().collect::<Vec<_>>(), members);
        // Hysteresis: back at 4096 and below, still dense until under 2048.
        for (i, &c) in members.iter().enumerate() {
            assert!(s.remove(c));
            let left = 5000 - (i + 1);
            let want = match left {
                0 => "none",
                l if l < 2048 => "sparse",
                _ => "dense",
            };
            assert_eq!(kind_at(&s, base), want, "with {left} left");
            if left % 500 == 0 {
                assert_invariants(&s);
                assert_eq!(s.iter().collect::<Vec<_>>(), members[i + 1..]);
            }
        }
        assert!(s.is_empty());
        assert!(s.containers.is_empty());
    }

    #[test]
    fn equality_ignores_the_representation() {
        // The same 3000 members, dense in `a` (grown past 4096 and shrunk), sparse in `b`.
        let mut a = ChunkSet::new();
        for c in 0..5000 {
            a.insert(c);
        }
        for c in 3000..5000 {
            a.remove(c);
        }
        let mut b = ChunkSet::new();
        for c in 0..3000 {
            b.insert(c);
        }
        assert_eq!(kind_at(&a, 0), "dense");
        assert_eq!(kind_at(&b, 0), "sparse");
        assert_eq!(a, b);
        let mut c = b.clone();
        c.remove(0);
        assert_ne!(a, c);
    }

    #[test]
    fn debug_shows_the_count_and_the_first_members() {
        let mut s = ChunkSet::new();
        s.insert(5);
        s.insert(1 << 20);
        assert_eq!(
            format!("{s:?}"),
            "ChunkSet { len: 2, containers: 2, members: {5, 1048576} }"
        );
        for c in 0..100 {
            s.insert(c);
        }
        assert!(format!("{s:?}").ends_with("31, ..} }"), "{s:?}");
    }

    #[test]
    fn heap_of_one_million_random_members_in_16m_chunks() {
        let mut rng = SplitMix(1);
        let mut s = ChunkSet::new();
        while s.len() < 1_000_000 {
            s.insert(rng.next_u64() % (1 << 24));
        }
        assert_invariants(&s);
        let bytes = s.heap_bytes();
        let dense = s
            .containers
            .iter()
            .filter(|(_, c)| matches!(c, Container::Dense { .. }))
            .count();
        eprintln!(
            "1M random members of 0..2^24: heap_bytes {bytes}, {} containers, {dense} dense",
            s.containers.len()
        );
        assert!(bytes <= 2_200_000, "{bytes} bytes");
    }

    #[test]
    fn heap_of_a_thousand_members_over_2_pow_40() {
        let mut rng = SplitMix(2);
        let mut s = ChunkSet::new();
        while s.len() < 1000 {
            s.insert(rng.next_u64() % (1 << 40));
        }
        let bytes = s.heap_bytes();
        eprintln!("1000 random members of 0..2^40: heap_bytes {bytes}");
        // One container each: the vector of containers dominates, about 32 bytes each.
        assert!(bytes <= 48 * 1024, "{bytes} bytes");
    }

    #[test]
    fn encoding_layout() {
        let bytes = encode_set(&[(2 << 16) + 1, 3, (2 << 16) + 0x102]);
        let mut want = Vec::new();
        want.extend_from_slice(b"CXCS");
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&0u64.to_le_bytes());
        want.push(0);
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&3u16.to_le_bytes());
        want.extend_from_slice(&2u64.to_le_bytes());
        want.push(0);
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&1u16.to_le_bytes());
        want.extend_from_slice(&0x102u16.to_le_bytes());
        assert_eq!(bytes, want);
    }

    #[test]
    fn dense_encoding_layout_and_round_trip() {
        let members: Vec<u64> = (0..5000u64).map(|i| (9 << 16) + i * 3).collect();
        let bytes = encode_set(&members);
        assert_eq!(bytes.len(), HEADER_BYTES + CONTAINER_HEADER_BYTES + 8192);
        assert_eq!(bytes[HEADER_BYTES + 8], KIND_DENSE);
        // Members 0 and 3 of the container: bits 0 and 3 of word 0.
        let w0 = &bytes[HEADER_BYTES + CONTAINER_HEADER_BYTES..][..8];
        assert_eq!(w0[0] & 0b1001, 0b1001);
        let s = ChunkSet::decode(&bytes).unwrap();
        assert_invariants(&s);
        assert_eq!(s.iter().collect::<Vec<_>>(), members);
        assert_eq!(s.encode(), bytes);
    }

    #[test]
    fn decode_keeps_a_small_bitmap_sparse() {
        let mut buf = Vec::new();
        buf.extend_from_slice(b"CXCS");
        buf.extend_from_slice(&1u32.to_le_bytes());
        buf.extend_from_slice(&2u64.to_le_bytes());
        buf.extend_from_slice(&1u32.to_le_bytes());
        buf.extend_from_slice(&5u64.to_le_bytes());
        buf.push(KIND_DENSE);
        buf.extend_from_slice(&2u32.to_le_bytes());
        let mut words = [0u64; WORDS];
        words[0] = 1;
        words[WORDS - 1] = 1 << 63;
        for w in words {
            buf.extend_from_slice(&w.to_le_bytes());
        }
        let s = ChunkSet::decode(&buf).unwrap();
        assert_invariants(&s);
        assert_eq!(kind_at(&s, 5 << 16), "sparse");
        assert_eq!(s.iter().collect::<Vec<_>>(), [5 << 16, (6 << 16) - 1]);
    }

    /// A valid encoding of one sparse container {1, 2} at key 0, with `edit` applied.
    fn edited(edit: impl FnOnce(&mut Vec<u8>)) -> Result<ChunkSet, String> {
        let mut buf = encode_set(&[1, 2]);
        edit(&mut buf);
        ChunkSet::decode(&buf)
    }

    #[test]
    fn decode_names_each_broken_rule_and_its_offset() {
        let set_u32 = |buf: &mut Vec<u8>, at: usize, v: u32| {
            buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        let cases: Vec<(&str, Result<ChunkSet, String>)> = vec![
            ("at byte 0: bad magic", edited(|b| b[0] = b'X')),
            ("at byte 4: unknown version 2", edited(|b| set_u32(b, 4, 2))),
            ("at byte 8: the set claims 3 members", edited(|b| b[8] = 3)),
            (
                "at byte 37: truncated: container key",
                edited(|b| set_u32(b, 16, 2)),
            ),
            (
                "at byte 28: unknown container kind 7",
                edited(|b| b[28] = 7),
            ),
            (
                "at byte 29: sparse container of 0",
                edited(|b| set_u32(b, 29, 0)),
            ),
            (
                "at byte 29: sparse container of 4097",
                edited(|b| set_u32(b, 29, 4097)),
            ),
            ("at byte 33: truncated", edited(|b| set_u32(b, 29, 3))),
            (
                "at byte 35: sparse member 1 not above",
                edited(|b| b[35] = 1),
            ),
            ("at byte 37: 1 trailing bytes", edited(|b| b.push(0))),
            ("at byte 20: container key", edited(|b| b[27] = 0xFF)),
            (
                "at byte 37: container key 0 not above",
                edited(|b| {
                    let again = b[20..].to_vec();
                    b.extend_from_slice(&again);
                    set_u32(b, 16, 2);
                    b[8] = 4;
                }),
            ),
            (
                "at byte 29: dense container of 65537",
                edited(|b| {
                    b[28] = KIND_DENSE;
                    set_u32(b, 29, 65_537);
                }),
            ),
            (
                "at byte 29: dense container claims 2 members, its bitmap has 0",
                edited(|b| {
                    b.truncate(33);
                    b[28] = KIND_DENSE;
                    b.extend_from_slice(&[0; WORDS * 8]);
                }),
            ),
        ];
        for (want, got) in cases {
            let err = got.expect_err(want);
            assert!(err.contains(want), "want {want:?}, got {err:?}");
        }
    }

    #[test]
    fn decode_rejects_every_truncation() {
        let mut members: Vec<u64> = (0..5000).map(|i| i * 2).collect();
        members.extend([1 << 30, (1 << 30) + 5, u64::MAX]);
        let bytes = encode_set(&members);
        for n in 0..bytes.len() {
            assert!(
                ChunkSet::decode(&bytes[..n]).is_err(),
                "prefix of {n} bytes"
            );
        }
        assert!(ChunkSet::decode(&bytes).is_ok());
    }

    #[test]
    fn decode_of_a_huge_container_count_allocates_little() {
        let mut buf = Vec::new();
        buf.extend_from_slice(b"CXCS");
        buf.extend_from_slice(&1u32.to_le_bytes());
        buf.extend_from_slice(&u64::MAX.to_le_bytes());
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = ChunkSet::decode(&buf).unwrap_err();
        assert!(err.contains("at byte 20: truncated"), "{err}");
    }

    /// Chunks for the model tests: most in the container of key 1 (65_536..131_072),
    /// where the runs of [`Op`] go too, some over three containers, a few at the very top
    /// of the range.
    fn chunk() -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => 68_000u64..76_000,
            1 => 0u64..200_000,
            1 => (u64::MAX - 100)..=u64::MAX,
        ]
    }

    /// One step of the model test.
    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64),
        Remove(u64),
        Contains(u64),
        /// Inserts (`true`) or removes the consecutive chunks `start..start + len` of the
        /// container of key 1: a few runs take it past 4096 members or below 2048.
        Run(bool, u64, u64),
    }

    /// Steps whose runs insert with probability `insert_runs` (0.0 to 1.0).
    fn ops(insert_runs: f64) -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            4 => chunk().prop_map(Op::Insert),
            3 => chunk().prop_map(Op::Remove),
            1 => chunk().prop_map(Op::Contains),
            1 => (proptest::bool::weighted(insert_runs), 66_000u64..76_000, 0u64..4000)
                .prop_map(|(ins, start, len)| Op::Run(ins, start, len)),
        ];
        proptest::collection::vec(op, 0..120)
    }

    /// Applies `ops` to both sets, comparing every answer and, at the end, the members.
    fn apply(s: &mut ChunkSet, model: &mut BTreeSet<u64>, ops: &[Op]) -> Result<(), TestCaseError> {
        for op in ops {
            match *op {
                Op::Insert(c) => prop_assert_eq!(s.insert(c), model.insert(c)),
                Op::Remove(c) => prop_assert_eq!(s.remove(c), model.remove(&c)),
                Op::Contains(c) => prop_assert_eq!(s.contains(c), model.contains(&c)),
                Op::Run(true, start, len) => {
                    for c in start..start + len {
                        prop_assert_eq!(s.insert(c), model.insert(c));
                    }
                }
                Op::Run(false, start, len) => {
                    for c in start..start + len {
                        prop_assert_eq!(s.remove(c), model.remove(&c));
                    }
                }
            }
            prop_assert_eq!(s.len(), model.len() as u64);
        }
        assert_invariants(s);
        prop_assert!(s.iter().eq(model.iter().copied()));
        Ok(())
    }

    /// A set of scattered chunks plus a run that makes the container of key 1 dense when
    /// longer than 4096.
    fn some_set() -> impl Strategy<Value = ChunkSet> {
        (
            proptest::collection::vec(chunk(), 0..2000),
            66_000u64..70_000,
            0u64..6000,
        )
            .prop_map(|(singles, start, len)| {
                let mut s = ChunkSet::new();
                for c in singles.into_iter().chain(start..start + len) {
                    s.insert(c);
                }
                s
            })
    }

    #[test]
    fn sorted_inserts_equal_single_inserts_and_report_the_first_duplicate() {
        let mut rng = SplitMix(0x1234_5678);
        let mut next = || rng.next_u64();
        let mut one = ChunkSet::new();
        let mut bulk = ChunkSet::new();
        for round in 0..6 {
            let mut keys: Vec<u64> = (0..3000).map(|_| next() % 300_000).collect();
            keys.sort_unstable();
            keys.dedup();
            keys.retain(|&k| !one.contains(k));
            for &k in &keys {
                assert!(one.insert(k));
            }
            assert_eq!(bulk.insert_sorted(&keys), Ok(()), "round {round}");
            assert_eq!(bulk, one);
            assert_eq!(bulk.len(), one.len());
        }
        let present = one.iter().nth(100).unwrap();
        assert_eq!(bulk.insert_sorted(&[present]), Err(present));
        assert_eq!(bulk.insert_sorted(&[5, 5]), Err(5));
        assert_eq!(bulk.insert_sorted(&[9_000_000, 8_000_000]), Err(8_000_000));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn matches_a_btreeset(
            grow in ops(0.9),
            mixed in ops(0.5),
            shrink in ops(0.05),
            probes in proptest::collection::vec(chunk(), 0..200),
        ) {
            let mut s = ChunkSet::new();
            let mut model = BTreeSet::new();
            // Runs that mostly insert, then either, then mostly remove: the container of
            // key 1 crosses 4096 up and 2048 down, often several times.
            apply(&mut s, &mut model, &grow)?;
            apply(&mut s, &mut model, &mixed)?;
            apply(&mut s, &mut model, &shrink)?;
            for c in probes {
                prop_assert_eq!(s.contains(c), model.contains(&c));
            }
            let back = ChunkSet::decode(&s.encode()).map_err(TestCaseError::fail)?;
            assert_invariants(&back);
            prop_assert_eq!(&back, &s);
        }
    }

    proptest! {
        #[test]
        fn round_trip(s in some_set()) {
            let bytes = s.encode();
            let back = ChunkSet::decode(&bytes).map_err(TestCaseError::fail)?;
            assert_invariants(&back);
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(back.encode(), bytes);
        }

        #[test]
        fn random_bytes_are_rejected(buf in proptest::collection::vec(any::<u8>(), 0..4096)) {
            prop_assert!(ChunkSet::decode(&buf).is_err());
        }

        #[test]
        fn random_bodies_never_panic(
            len in any::<u64>(),
            count in prop_oneof![0u32..4, any::<u32>()],
            body in proptest::collection::vec(any::<u8>(), 0..9000),
        ) {
            let mut buf = b"CXCS".to_vec();
            buf.extend_from_slice(&1u32.to_le_bytes());
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&count.to_le_bytes());
            buf.extend_from_slice(&body);
            if let Ok(s) = ChunkSet::decode(&buf) {
                assert_invariants(&s);
            }
        }

        #[test]
        fn corrupting_one_byte_never_panics(
            s in some_set(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let mut bytes = s.encode();
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
            // Without a checksum a corruption may keep every rule (a sparse member moved
            // within its neighbours); then the result is a valid set that re-encodes to
            // the same bytes.
            if let Ok(back) = ChunkSet::decode(&bytes) {
                assert_invariants(&back);
                prop_assert_eq!(back.encode(), bytes);
            }
        }
    }
}
