//! The in-memory candidate index for vector search, one per open tenant database.
//!
//! Vectors are stored as float32 in the tenant's database (the truth, used for the
//! final scores). This index keeps two smaller copies of each: one sign bit per
//! dimension (48 bytes for 384 dimensions, against 1,536) and one signed byte per
//! dimension with a scale. A search scans the sign bits of the rows of the caller's
//! allowed datasources (and, with a metadata filter, only the chunks the filter admits),
//! keeps the nearest by Hamming distance, reranks those by their byte vectors, and the
//! caller rescores the best few from the stored floats. Restricting before ranking is
//! what lets `top_k` always fill from allowed data.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};

use super::RetrievalError;

/// Largest vector dimension accepted.
pub const MAX_DIM: usize = 4096;

/// Checks a vector given by a client and returns it scaled to unit length.
pub fn normalized(v: &[f32]) -> Result<Vec<f32>, RetrievalError> {
    if v.is_empty() || v.len() > MAX_DIM {
        return Err(RetrievalError::Invalid(format!(
            "vector: 1..={MAX_DIM} numbers"
        )));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(RetrievalError::Invalid(
            "vector: every number must be finite".into(),
        ));
    }
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return Err(RetrievalError::Invalid(
            "vector: must not be all zeros".into(),
        ));
    }
    Ok(v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
}

/// A vector as stored: little-endian float32.
pub fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A stored vector back as floats (`None` if the blob is not whole floats).
pub fn from_blob(b: &[u8]) -> Option<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return None;
    }
    Some(
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Cosine similarity of two unit vectors of one length.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums let the compiler vectorize without reassociating floats.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Sign bits of `v`, 64 dimensions per word.
fn signs(v: &[f32], out: &mut Vec<u64>) {
    for block in v.chunks(64) {
        let mut w = 0u64;
        for (i, x) in block.iter().enumerate() {
            if *x > 0.0 {
                w |= 1 << i;
            }
        }
        out.push(w);
    }
}

/// `v` as signed bytes, and the scale that maps them back.
fn quantize(v: &[f32], out: &mut Vec<i8>) -> f32 {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    out.extend(
        v.iter()
            .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8),
    );
    scale
}

fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| i32::from(*x) * i32::from(*y))
        .sum()
}

/// Sign-bit and byte sketches of every vector of one tenant database.
#[derive(Debug, Default)]
pub struct VectorIndex {
    dim: usize,
    words: usize,
    chunks: Vec<i64>,
    sources: Vec<i64>,
    bits: Vec<u64>,
    bytes: Vec<i8>,
    scales: Vec<f32>,
    slot: HashMap<i64, usize>,
}

impl VectorIndex {
    /// An empty index for vectors of `dim` dimensions.
    pub fn new(dim: usize) -> VectorIndex {
        VectorIndex {
            dim,
            words: dim.div_ceil(64),
            ..VectorIndex::default()
        }
    }

    /// Vectors held.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Adds (or replaces) the vector of `chunk`, which belongs to datasource `source`.
    pub fn insert(&mut self, chunk: i64, source: i64, v: &[f32]) {
        if v.len() != self.dim {
            return;
        }
        self.remove(chunk);
        self.slot.insert(chunk, self.chunks.len());
        self.chunks.push(chunk);
        self.sources.push(source);
        signs(v, &mut self.bits);
        let scale = quantize(v, &mut self.bytes);
        self.scales.push(scale);
    }

    /// Drops the vector of `chunk`, if held (the last slot moves into its place).
    pub fn remove(&mut self, chunk: i64) {
        let Some(at) = self.slot.remove(&chunk) else {
            return;
        };
        let last = self.chunks.len() - 1;
        if at != last {
            let moved = self.chunks[last];
            self.chunks.swap(at, last);
            self.sources.swap(at, last);
            self.scales.swap(at, last);
            for w in 0..self.words {
                self.bits.swap(at * self.words + w, last * self.words + w);
            }
            for d in 0..self.dim {
                self.bytes.swap(at * self.dim + d, last * self.dim + d);
            }
            self.slot.insert(moved, at);
        }
        self.chunks.pop();
        self.sources.pop();
        self.scales.pop();
        self.bits.truncate(last * self.words);
        self.bytes.truncate(last * self.dim);
    }

    /// Up to `n` chunks nearest to `query`, best first, among those of datasources in
    /// `sources` and, when given, in `only`: the `wide` nearest by sign agreement,
    /// reranked by their byte vectors.
    pub fn nearest(
        &self,
        query: &[f32],
        sources: &[i64],
        only: Option<&HashSet<i64>>,
        wide: usize,
        n: usize,
    ) -> Vec<i64> {
        let slots = self.by_signs(query, sources, only, wide.max(n));
        let mut q = Vec::with_capacity(self.dim);
        quantize(query, &mut q);
        let mut scored: Vec<(f32, usize)> = slots
            .into_iter()
            .map(|i| {
                let row = &self.bytes[i * self.dim..(i + 1) * self.dim];
                (dot_i8(row, &q) as f32 * self.scales[i], i)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored
            .into_iter()
            .take(n)
            .map(|(_, i)| self.chunks[i])
            .collect()
    }

    /// Slots of up to `n` allowed vectors nearest to `query` by sign agreement (ties at
    /// the cut broken by slot order).
    fn by_signs(
        &self,
        query: &[f32],
        sources: &[i64],
        only: Option<&HashSet<i64>>,
        n: usize,
    ) -> Vec<usize> {
        if query.len() != self.dim || n == 0 {
            return Vec::new();
        }
        let mut q = Vec::with_capacity(self.words);
        signs(query, &mut q);
        let allowed = |i: usize| {
            sources.contains(&self.sources[i])
                && only.is_none_or(|set| set.contains(&self.chunks[i]))
        };
        // One pass for the distances, a histogram for the cut, one pass to collect:
        // linear in the rows, with no sort of the whole tenant.
        let mut dist: Vec<(u16, u32)> = Vec::new();
        let mut histogram = vec![0usize; self.dim + 1];
        for (i, sketch) in self.bits.chunks_exact(self.words).enumerate() {
            if !allowed(i) {
                continue;
            }
            let d: u32 = sketch
                .iter()
                .zip(&q)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            histogram[d as usize] += 1;
            dist.push((d as u16, i as u32));
        }
        let mut cut = 0;
        let mut taken = 0;
        while cut < histogram.len() && taken + histogram[cut] <= n {
            taken += histogram[cut];
            cut += 1;
        }
        let mut out = Vec::with_capacity(n.min(dist.len()));
        let mut at_cut = n - taken;
        for (d, i) in dist {
            let d = usize::from(d);
            if d < cut {
                out.push(i as usize);
            } else if d == cut && at_cut > 0 {
                at_cut -= 1;
                out.push(i as usize);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u64, dim: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let v: Vec<f32> = (0..dim)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect();
        normalized(&v).unwrap()
    }

    #[test]
    fn candidates_come_only_from_allowed_sources_and_chunks() {
        let mut ix = VectorIndex::new(96);
        for c in 0..300 {
            ix.insert(c, c % 3, &unit(c as u64, 96));
        }
        let q = unit(7, 96);
        let got = ix.nearest(&q, &[1], None, 60, 50);
        assert_eq!(got.len(), 50);
        assert!(got.iter().all(|c| c % 3 == 1));
        let only: HashSet<i64> = [1, 4, 7, 2].into_iter().collect();
        let mut got = ix.nearest(&q, &[1], Some(&only), 60, 50);
        got.sort_unstable();
        assert_eq!(got, vec![1, 4, 7]);
        assert!(ix.nearest(&q, &[9], None, 60, 50).is_empty());
    }

    #[test]
    fn the_query_itself_is_the_first_candidate_and_removal_forgets_it() {
        let mut ix = VectorIndex::new(384);
        for c in 0..1000 {
            ix.insert(c, 0, &unit(c as u64, 384));
        }
        let q = unit(500, 384);
        assert_eq!(ix.nearest(&q, &[0], None, 10, 1), vec![500]);
        ix.remove(500);
        ix.remove(500);
        assert_eq!(ix.len(), 999);
        assert!(!ix.nearest(&q, &[0], None, 999, 999).contains(&500));
        // The slot that moved into the hole is still found by its own query.
        assert_eq!(ix.nearest(&unit(999, 384), &[0], None, 10, 1), vec![999]);
        // Byte vectors rank like the floats they stand for.
        let exact = |q: &[f32]| {
            let mut all: Vec<(f32, i64)> = (0..1000)
                .filter(|c| *c != 500)
                .map(|c| (dot(q, &unit(c as u64, 384)), c))
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0));
            all.into_iter().take(5).map(|(_, c)| c).collect::<Vec<_>>()
        };
        let q = unit(12345, 384);
        assert_eq!(ix.nearest(&q, &[0], None, 999, 5), exact(&q));
    }

    #[test]
    fn bad_vectors_are_refused() {
        assert!(normalized(&[]).is_err());
        assert!(normalized(&[0.0, 0.0]).is_err());
        assert!(normalized(&[f32::NAN, 1.0]).is_err());
        assert!(normalized(&[f32::MAX, f32::MAX]).is_ok());
        let v = normalized(&[3.0, 4.0]).unwrap();
        assert!((dot(&v, &v) - 1.0).abs() < 1e-6);
        assert_eq!(from_blob(&to_blob(&v)).unwrap(), v);
        assert!(from_blob(&[1, 2, 3]).is_none());
    }
}
