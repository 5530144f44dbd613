//! CPython's `random.Random`, reproduced exactly.
//!
//! The core is MT19937 as in CPython's `Modules/_randommodule.c` (seeded through `init_by_array` on
//! the seed's 32-bit words), and the derived methods follow `Lib/random.py` of CPython 3.11:
//! `_randbelow_with_getrandbits` (rejection sampling on `n.bit_length()` bits), `shuffle`
//! (backwards Fisher-Yates), `sample` (pool or set branch, chosen like CPython). Every method
//! consumes the generator exactly as CPython does, so a sequence of calls on one [`PyRandom`] gives
//! the same values as the same sequence on one `random.Random(seed)`.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// CPython's `random.Random` (MT19937), reproducing its outputs exactly.
#[derive(Clone)]
pub struct PyRandom {
    state: [u32; N],
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl PyRandom {
    /// `random.Random(seed)` for a non-negative int seed (CPython `init_by_array` on the seed's
    /// 32-bit words, little-endian, at least one word).
    pub fn new(seed: u64) -> Self {
        let lo = seed as u32;
        let hi = (seed >> 32) as u32;
        if hi == 0 {
            Self::from_key(&[lo])
        } else {
            Self::from_key(&[lo, hi])
        }
    }

    /// `init_genrand(19650218)` followed by `init_by_array(key)`.
    fn from_key(key: &[u32]) -> Self {
        let mut mt = [0u32; N];
        mt[0] = 19_650_218;
        for i in 1..N {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        let key_length = key.len();
        let mut i = 1usize;
        let mut j = 0usize;
        for _ in 0..N.max(key_length) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key_length {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        Self {
            state: mt,
            index: N,
        }
    }

    /// Regenerates the 624 words of state (the "twist").
    fn twist(&mut self) {
        let mag01 = |y: u32| if y & 1 == 0 { 0 } else { MATRIX_A };
        let mt = &mut self.state;
        for kk in 0..N - M {
            let y = (mt[kk] & UPPER_MASK) | (mt[kk + 1] & LOWER_MASK);
            mt[kk] = mt[kk + M] ^ (y >> 1) ^ mag01(y);
        }
        for kk in N - M..N - 1 {
            let y = (mt[kk] & UPPER_MASK) | (mt[kk + 1] & LOWER_MASK);
            mt[kk] = mt[kk + M - N] ^ (y >> 1) ^ mag01(y);
        }
        let y = (mt[N - 1] & UPPER_MASK) | (mt[0] & LOWER_MASK);
        mt[N - 1] = mt[M - 1] ^ (y >> 1) ^ mag01(y);
        self.index = 0;
    }

    /// `genrand_uint32`: the next tempered 32-bit output.
    fn genrand_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `random.getrandbits(k)` for `k <= 64`; `getrandbits(0)` is 0 and consumes nothing.
    ///
    /// For `k <= 32` one word shifted right by `32 - k`; above, 32-bit words fill the result from
    /// the least significant end, the last one shifted right by `32 - remaining bits`.
    ///
    /// # Panics
    /// If `k > 64`.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!(k <= 64, "getrandbits: k = {k} > 64 is not supported");
        if k == 0 {
            return 0;
        }
        if k <= 32 {
            return u64::from(self.genrand_u32() >> (32 - k));
        }
        let mut out = 0u64;
        let mut left = k;
        let mut shift = 0u32;
        while left > 0 {
            let mut r = self.genrand_u32();
            if left < 32 {
                r >>= 32 - left;
            }
            out |= u64::from(r) << shift;
            shift += 32;
            left = left.saturating_sub(32);
        }
        out
    }

    /// `random.random()`: a 53-bit float in [0, 1) from two words, `(a >> 5, b >> 6)`.
    pub fn random(&mut self) -> f64 {
        let a = self.genrand_u32() >> 5;
        let b = self.genrand_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `_randbelow_with_getrandbits(n)`: k = n.bit_length(); r = getrandbits(k) until r < n.
    ///
    /// # Panics
    /// If `n == 0` (CPython never returns there).
    pub fn randbelow(&mut self, n: u64) -> u64 {
        assert!(n > 0, "randbelow: n must be positive");
        let k = u64::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `random.randrange(start, stop)`: `start + randbelow(stop - start)`.
    ///
    /// # Panics
    /// On an empty range (`stop <= start`), where CPython raises `ValueError`.
    pub fn randrange(&mut self, start: i64, stop: i64) -> i64 {
        let width = i128::from(stop) - i128::from(start);
        assert!(width > 0, "empty range for randrange() ({start}, {stop})");
        let r = self.randbelow(width as u64);
        (i128::from(start) + i128::from(r)) as i64
    }

    /// `random.randint(a, b)`: `randrange(a, b + 1)`, both ends included.
    ///
    /// # Panics
    /// If `b < a` (or `b == i64::MAX`, beyond this port's range).
    pub fn randint(&mut self, a: i64, b: i64) -> i64 {
        let stop = b.checked_add(1).expect("randint: b + 1 overflows i64");
        self.randrange(a, stop)
    }

    /// `random.choice(seq)`: `seq[randbelow(len)]`; `None` (consuming nothing) for an empty slice,
    /// where CPython raises `IndexError`.
    pub fn choice<'a, T>(&mut self, seq: &'a [T]) -> Option<&'a T> {
        if seq.is_empty() {
            return None;
        }
        let j = self.randbelow(seq.len() as u64) as usize;
        Some(&seq[j])
    }

    /// `random.shuffle(x)`: for i in reversed(range(1, len)): j = randbelow(i+1); swap(i, j).
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.randbelow(i as u64 + 1) as usize;
            x.swap(i, j);
        }
    }

    /// `random.sample(population, k)` with CPython 3.11's algorithm exactly: the pool-based branch
    /// when `n <= setsize`, the set-based one (reselecting drawn indices) otherwise, where
    /// `setsize = 21`, plus `4 ** ceil(log(3k, 4))` when `k > 5`. `None` (consuming nothing) when
    /// `k > n`, where CPython raises `ValueError`.
    pub fn sample<T: Clone>(&mut self, population: &[T], k: usize) -> Option<Vec<T>> {
        let n = population.len();
        if k > n {
            return None;
        }
        let mut setsize = 21usize;
        if k > 5 {
            setsize = setsize.saturating_add(pow4_ceil(k.saturating_mul(3)));
        }
        let mut result = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow((n - i) as u64) as usize;
                result.push(population[pool[j]].clone());
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n as u64) as usize;
                while !selected.insert(j) {
                    j = self.randbelow(n as u64) as usize;
                }
                result.push(population[j].clone());
            }
        }
        Some(result)
    }
}

/// `4 ** ceil(log(x, 4))` for `x >= 1`: the smallest power of 4 that is `>= x`.
///
/// CPython computes the exponent in floating point; for the `x = 3k` it is called with, `x` is
/// never a power of 4 (those are not multiples of 3) and is far enough from one that the float
/// `ceil` agrees with this exact integer form.
fn pow4_ceil(x: usize) -> usize {
    let mut p = 1usize;
    while p < x {
        p = p.saturating_mul(4);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/pyrandom/expected.json"
        );
        let text = std::fs::read_to_string(path).expect("read pyrandom fixture");
        serde_json::from_str(&text).expect("parse pyrandom fixture")
    }

    fn u64s(v: &Value) -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    }

    fn i64s(v: &Value) -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    }

    fn strs(v: &Value) -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    }

    fn float(v: &Value) -> f64 {
        v.as_str().unwrap().parse::<f64>().unwrap()
    }

    fn strings808() -> Vec<String> {
        (0..808).map(|i| format!("combo-{i:03}")).collect()
    }

    fn seeds() -> Vec<(u64, Value)> {
        let fx = fixture();
        let seeds: Vec<(u64, Value)> = fx["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["seed"].as_u64().unwrap(), s.clone()))
            .collect();
        assert_eq!(seeds.len(), 4);
        seeds
    }

    #[test]
    fn reference_mt19937_init_by_array() {
        // Matsumoto & Nishimura's mt19937ar.c test vector: init_by_array({0x123, 0x234, 0x345, 0x456}).
        let mut r = PyRandom::from_key(&[0x123, 0x234, 0x345, 0x456]);
        let first: Vec<u32> = (0..5).map(|_| r.genrand_u32()).collect();
        assert_eq!(
            first,
            [
                1_067_595_299,
                955_945_823,
                477_289_528,
                4_107_218_783,
                4_228_976_476
            ]
        );
    }

    #[test]
    fn getrandbits32_matches_cpython() {
        for (seed, s) in seeds() {
            let mut r = PyRandom::new(seed);
            let got: Vec<u64> = (0..20).map(|_| r.getrandbits(32)).collect();
            assert_eq!(got, u64s(&s["getrandbits32"]), "seed {seed}");
        }
    }

    #[test]
    fn random_matches_cpython() {
        for (seed, s) in seeds() {
            let mut r = PyRandom::new(seed);
            for (i, want) in s["random"].as_array().unwrap().iter().enumerate() {
                let got = r.random();
                assert_eq!(got.to_bits(), float(want).to_bits(), "seed {seed} draw {i}");
            }
        }
    }

    #[test]
    fn getrandbits_k_matches_cpython() {
        for (seed, s) in seeds() {
            let mut r = PyRandom::new(seed);
            for case in s["getrandbits_k"].as_array().unwrap() {
                let k = case[0].as_u64().unwrap() as u32;
                let got: Vec<u64> = (0..3).map(|_| r.getrandbits(k)).collect();
                assert_eq!(got, u64s(&case[1]), "seed {seed} k {k}");
            }
        }
    }

    #[test]
    fn randbelow_and_randrange_match_cpython() {
        for (seed, s) in seeds() {
            let mut r = PyRandom::new(seed);
            for case in s["randbelow"].as_array().unwrap() {
                let n = case[0].as_u64().unwrap();
                let got: Vec<u64> = (0..10).map(|_| r.randbelow(n)).collect();
                assert_eq!(got, u64s(&case[1]), "seed {seed} randbelow({n})");
            }
            let mut r = PyRandom::new(seed);
            for case in s["randrange"].as_array().unwrap() {
                let n = case[0].as_i64().unwrap();
                let got: Vec<i64> = (0..10).map(|_| r.randrange(0, n)).collect();
                assert_eq!(got, i64s(&case[1]), "seed {seed} randrange(0, {n})");
            }
            let mut r = PyRandom::new(seed);
            let got: Vec<i64> = (0..10).map(|_| r.randrange(-50, 50)).collect();
            assert_eq!(got, i64s(&s["randrange_offset"]), "seed {seed}");
            let got: Vec<i64> = (0..10).map(|_| r.randint(1, 6)).collect();
            assert_eq!(got, i64s(&s["randint"]), "seed {seed}");
            let pop = strings808();
            let got: Vec<String> = (0..5).map(|_| r.choice(&pop).unwrap().clone()).collect();
            assert_eq!(got, strs(&s["choice"]), "seed {seed}");
        }
    }

    #[test]
    fn shuffle_matches_cpython() {
        for (seed, s) in seeds() {
            for n in [10u64, 48] {
                let mut r = PyRandom::new(seed);
                let mut x: Vec<u64> = (0..n).collect();
                let want = s["shuffle"][n.to_string()].as_array().unwrap();
                assert_eq!(want.len(), 3);
                for (round, w) in want.iter().enumerate() {
                    r.shuffle(&mut x);
                    assert_eq!(x, u64s(w), "seed {seed} n {n} round {round}");
                }
            }
        }
    }

    #[test]
    fn sample_matches_cpython() {
        let pop808 = strings808();
        for (seed, s) in seeds() {
            let smp = &s["sample"];
            let range = |n: u64| (0..n).collect::<Vec<u64>>();
            let cases: [(&str, u64, usize); 6] = [
                ("range100_k5", 100, 5),
                ("range30_k25", 30, 25),
                ("range20_k5", 20, 5),
                ("range2000_k300", 2000, 300),
                ("range10_k0", 10, 0),
                ("range7_k7", 7, 7),
            ];
            for (name, n, k) in cases {
                let got = PyRandom::new(seed).sample(&range(n), k).unwrap();
                assert_eq!(got, u64s(&smp[name]), "seed {seed} {name}");
            }
            for (name, k) in [("strings808_k4", 4), ("strings808_k300", 300)] {
                let got = PyRandom::new(seed).sample(&pop808, k).unwrap();
                assert_eq!(got, strs(&smp[name]), "seed {seed} {name}");
            }
        }
    }

    #[test]
    fn mixed_sequence_matches_cpython() {
        let pop808 = strings808();
        for (seed, s) in seeds() {
            let want = s["mixed"].as_array().unwrap();
            let mut r = PyRandom::new(seed);
            let mut keys: Vec<u64> = (0..12).collect();
            r.shuffle(&mut keys);
            assert_eq!(keys, u64s(&want[0]), "seed {seed} shuffle keys");
            let range8: Vec<u64> = (0..8).collect();
            assert_eq!(r.sample(&range8, 4).unwrap(), u64s(&want[1]), "seed {seed}");
            assert_eq!(r.randrange(0, 10), want[2].as_i64().unwrap(), "seed {seed}");
            let distractors = r.sample(&pop808, 4).unwrap();
            let mut opts = vec![pop808[0].clone()];
            opts.extend(distractors);
            r.shuffle(&mut opts);
            assert_eq!(opts, strs(&want[3]), "seed {seed} options");
            assert_eq!(r.getrandbits(40), want[4].as_u64().unwrap(), "seed {seed}");
            assert_eq!(
                r.random().to_bits(),
                float(&want[5]).to_bits(),
                "seed {seed}"
            );
            assert_eq!(r.randint(-3, 3), want[6].as_i64().unwrap(), "seed {seed}");
            assert_eq!(
                r.choice(&pop808).unwrap(),
                want[7].as_str().unwrap(),
                "seed {seed}"
            );
            let range2000: Vec<u64> = (0..2000).collect();
            let big_sample = r.sample(&range2000, 300).unwrap();
            assert_eq!(big_sample[295..], u64s(&want[8])[..], "seed {seed}");
            let mut big: Vec<u64> = (0..48).collect();
            r.shuffle(&mut big);
            assert_eq!(big, u64s(&want[9]), "seed {seed} shuffle 48");
            assert_eq!(r.getrandbits(32), want[10].as_u64().unwrap(), "seed {seed}");
        }
    }

    #[test]
    fn empty_inputs_consume_nothing() {
        let mut a = PyRandom::new(7);
        let mut b = PyRandom::new(7);
        let empty: [u8; 0] = [];
        assert!(a.choice(&empty).is_none());
        assert!(a.sample(&[1, 2, 3], 4).is_none());
        assert_eq!(a.sample(&empty, 0), Some(vec![]));
        a.shuffle(&mut [1u8]);
        assert_eq!(a.getrandbits(0), 0);
        assert_eq!(a.getrandbits(32), b.getrandbits(32));
    }

    #[test]
    fn pow4_ceil_matches_float_form() {
        for k in 6..100_000usize {
            let x = 3 * k;
            let e = ((x as f64).ln() / 4f64.ln()).ceil() as u32;
            assert_eq!(pow4_ceil(x), 4usize.pow(e), "k {k}");
        }
    }
}
