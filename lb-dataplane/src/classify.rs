//! Classifying a burst outside the data path's lock: [`Classifier`].

use std::sync::Arc;

use lb_core::{FlowHasher, FlowKey, IpProto};
use lb_packet::{parse, Fragment, Link};

use crate::fast::FastCache;
use crate::{Dataplane, Pre, Prefetched, Tables};

/// Where a burst keeps its packets' classifications: the data path's own ring, or what a
/// [`Classifier`] computed.
pub(crate) trait PreRing {
    /// Entry `j`'s place (`None` past the end: the packet is then classified when processed).
    fn at(&mut self, j: usize) -> Option<&mut Option<Pre>>;
    /// Whether entry `j` already holds the classification of packet `j`, of `len` bytes.
    fn classified(&self, j: usize, len: usize) -> bool;
}

/// The data path's own ring of `4 ×` [`crate::PIPELINE`] entries, filled as the burst goes.
pub(crate) struct OwnRing(pub(crate) [Option<Pre>; OWN_RING]);

/// Entries of [`OwnRing`].
pub(crate) const OWN_RING: usize = 4 * crate::PIPELINE;

impl PreRing for OwnRing {
    #[inline(always)]
    fn at(&mut self, j: usize) -> Option<&mut Option<Pre>> {
        self.0.get_mut(j % OWN_RING)
    }

    #[inline(always)]
    fn classified(&self, _: usize, _: usize) -> bool {
        false
    }
}

/// A [`Classifier`]'s burst, valid for the data path processing it.
pub(crate) struct Given<'a> {
    pres: &'a mut [Option<Pre>],
    lens: &'a [usize],
}

impl PreRing for Given<'_> {
    #[inline(always)]
    fn at(&mut self, j: usize) -> Option<&mut Option<Pre>> {
        self.pres.get_mut(j)
    }

    #[inline(always)]
    fn classified(&self, j: usize, len: usize) -> bool {
        self.lens.get(j) == Some(&len)
    }
}

/// Classifies bursts for one data path without its lock.
///
/// A data path shared by several queue threads sits behind one lock, and everything done while
/// it is held is serial. Part of a packet's work needs none of the data path's mutable state:
/// parsing it, finding its service in the tables in force and hashing its flow key. A
/// `Classifier` taken from the data path ([`Dataplane::classifier`], one per queue thread; it
/// is `Send`, and the tables are shared, not copied) does that part on the queue's own thread,
/// before the lock; [`Dataplane::process_batch_classified`] then starts its pipeline from the
/// classifications (prefetching the flow-table lines) instead of computing them.
///
/// The classifier holds the tables it classified against. When the data path's tables have
/// changed since (a reload, a health transition), or the classifier belongs to another data
/// path (other hash keys), its classifications are not used: the burst is classified again
/// under the lock, as [`Dataplane::process_batch`] does, and the classifier takes the new
/// tables for the next burst. A packet whose length is not the one it was classified with is
/// classified again too. So the verdicts are those of [`Dataplane::process_batch`] in every
/// case; only where the time is spent changes.
///
/// ```
/// # use std::sync::Arc;
/// # use lb_core::{HashKey, Instant};
/// # use lb_dataplane::*;
/// # let spec = DataplaneSpec::default();
/// # let key = HashKey::from_bytes([7; 16]);
/// # let mut cp = ControlPlane::new(spec.clone(), key).unwrap();
/// # let mut dp = Dataplane::new(&spec, cp.build().unwrap(), DataplaneOptions::new(key)).unwrap();
/// let mut cl = dp.classifier(32);
/// let mut bufs = vec![vec![0u8; HEADROOM + 64]; 2];
/// let lens = [20, 20];
/// let mut out = [Verdict::Held; 2];
/// cl.classify(&bufs, HEADROOM, &lens); // no lock needed for this
/// // ... then, with the data path locked:
/// dp.process_batch_classified(&mut cl, &mut bufs, &lens, None, Instant::ZERO, &mut out);
/// assert!(out.iter().all(|v| matches!(v, Verdict::Drop(_)))); // nothing to forward here
/// ```
#[derive(Debug, Clone)]
pub struct Classifier {
    link: Link,
    tables: Arc<Tables>,
    hash4: FlowHasher,
    hash6: FlowHasher,
    /// [`Dataplane`]'s `owner` fingerprint: equal only with the same flow-table hash keys.
    owner: u64,
    /// The offset of the packets in their buffers, of the last classified burst.
    pub(crate) start: usize,
    /// Per packet of the last classified burst: its classification and length.
    pub(crate) pres: Vec<Option<Pre>>,
    pub(crate) lens: Vec<usize>,
    /// Packets classified in the last burst and not yet processed.
    pub(crate) n: usize,
    /// The data path's generation and flow epochs of cached plans (module `fast`).
    pub(crate) gen: Arc<crate::fast::Epochs>,
    /// The fast path, once enabled ([`Classifier::enable_fast_path`]).
    pub(crate) fast: Option<Box<FastCache>>,
}

impl Classifier {
    /// A classifier for bursts of up to `batch` packets (allocates: control path).
    pub(crate) fn new(dp: &Dataplane, batch: usize) -> Classifier {
        Classifier {
            link: dp.link,
            tables: dp.tables.clone(),
            hash4: dp.ct4.flow_hasher().clone(),
            hash6: dp.ct6.flow_hasher().clone(),
            owner: dp.owner,
            start: 0,
            pres: vec![None; batch],
            lens: vec![0; batch],
            n: 0,
            gen: dp.gen.clone(),
            fast: None,
        }
    }

    /// The most packets one burst can be classified in (`batch` of
    /// [`Dataplane::classifier`]; packets beyond it are classified when processed).
    pub fn capacity(&self) -> usize {
        self.pres.len()
    }

    /// Classifies `bufs[i][start..start + lens[i]]` for the next
    /// [`Dataplane::process_batch_classified`] on the same buffers, unchanged (cut to the
    /// shortest of the two slices and the capacity). Reads the tables this classifier last
    /// saw; needs nothing else of the data path, so no lock.
    pub fn classify<B: AsRef<[u8]>>(&mut self, bufs: &[B], start: usize, lens: &[usize]) {
        let n = bufs.len().min(lens.len()).min(self.pres.len());
        self.start = start;
        self.n = n;
        if let Some(f) = self.fast.as_deref_mut() {
            f.done.fill(false);
            f.cand.fill(u32::MAX);
        }
        for ((b, &len), (pre, l)) in bufs
            .iter()
            .zip(lens)
            .zip(self.pres.iter_mut().zip(self.lens.iter_mut()))
            .take(n)
        {
            *l = len;
            pre_classify(
                self.link,
                &self.tables,
                [&self.hash4, &self.hash6],
                b.as_ref(),
                start,
                len,
                pre,
            );
        }
    }
}

/// Parses and classifies one packet and hashes its flow key, into `out`; `None` for whatever
/// the data path drops before its flow table, and for fragments (processing classifies those
/// again, counting the reason or taking the fragment path).
#[inline(always)]
pub(crate) fn pre_classify(
    link: Link,
    tables: &Tables,
    [hash4, hash6]: [&FlowHasher; 2],
    buf: &[u8],
    start: usize,
    len: usize,
    out: &mut Option<Pre>,
) {
    *out = None;
    let Some(pkt) = start.checked_add(len).and_then(|end| buf.get(start..end)) else {
        return;
    };
    let Ok(p) = parse(pkt, link) else {
        return;
    };
    if p.fragment != Fragment::None {
        return;
    }
    // Built in place and filled in: moving a parsed packet through a tuple and a `Result`
    // cost a store-forwarding stall per packet (fields at odd offsets reassembled).
    let x = out.insert(Pre {
        p,
        si: None,
        hash: Prefetched::of_hash(0),
    });
    let k = &x.p.key;
    x.si = tables.service_index(k.dst(), k.dst_port(), k.proto());
    let h = if k.is_ipv4() { hash4 } else { hash6 };
    x.hash = Prefetched::of_hash(h.hash_flow(k));
}

impl Dataplane {
    /// A [`Classifier`] for this data path, for bursts of up to `batch` packets (allocates:
    /// control path; keep one per queue thread).
    pub fn classifier(&self, batch: usize) -> Classifier {
        Classifier::new(self, batch)
    }

    /// [`Dataplane::process_batch`] (or, with `hdrs`, [`Dataplane::process_batch_offload`])
    /// for a burst `cl` classified ([`Classifier::classify`]): the same buffers at the same
    /// offset, unchanged. Same verdicts, bytes and counters as those; the parsing,
    /// classification and hashing already done are not done again. If the tables changed
    /// since, or `cl` belongs to another data path, the burst is classified here and `cl` takes
    /// the tables in force.
    pub fn process_batch_classified<B: AsMut<[u8]>>(
        &mut self,
        cl: &mut Classifier,
        bufs: &mut [B],
        lens: &[usize],
        hdrs: Option<&mut [crate::VnetHdr]>,
        now: lb_core::Instant,
        out: &mut [crate::Verdict],
    ) {
        let start = cl.start;
        let n = core::mem::take(&mut cl.n);
        let mine = cl.owner == self.owner && cl.link == self.link;
        let mut fast = cl.fast.as_deref_mut();
        if let Some(f) = fast.as_deref_mut() {
            if mine && Arc::ptr_eq(&cl.gen, &self.gen) {
                // What the fast path forwarded reaches the table before this burst does.
                self.fast_flush(f);
            } else {
                f.clear();
                fast = None;
            }
        }
        // (The packets the fast path forwarded, marked in `fast.done`, are skipped; a reload
        // since then does not matter to them: they were forwarded under the tables before it.)
        if mine && Arc::ptr_eq(&cl.tables, &self.tables) {
            // (`classify` keeps `n` within both vectors: never empty here but by misuse.)
            let mut given = Given {
                pres: cl.pres.get_mut(..n).unwrap_or_default(),
                lens: cl.lens.get(..n).unwrap_or_default(),
            };
            self.batch(bufs, start, lens, hdrs, now, out, &mut given, fast);
        } else {
            let mut own = OwnRing([None; OWN_RING]);
            self.batch(bufs, start, lens, hdrs, now, out, &mut own, fast);
            if mine {
                cl.tables = self.tables.clone();
            }
        }
        if let Some(f) = cl.fast.as_deref_mut() {
            f.done.fill(false);
            f.cand.fill(u32::MAX);
        }
    }
}

/// The fingerprint of a data path's flow-table hash keys: the hashes of one fixed key under
/// both ([`Classifier`] checks it, so that another data path's hashes are never used).
pub(crate) fn owner_of(hash4: &FlowHasher, hash6: &FlowHasher) -> u64 {
    let probe = FlowKey::v4_bits(0x0a00_0001, 1, 0x0a00_0002, 2, IpProto::Udp.number());
    hash4.hash_flow(&probe) ^ hash6.hash_flow(&probe).rotate_left(32)
}
