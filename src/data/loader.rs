//! Parallel decode + preprocess with prefetch, so a training step never waits on data.
//!
//! [`Prefetcher`] is generic: the trainer gives it one job per micro-batch (or per sample) and a
//! `make` function that decodes the images (`data::image::load_rgb`), runs the processor and does
//! the text work; the prefetcher runs `make` on a few worker threads ahead of the consumer and
//! hands the results back in job order.
//!
//! Scheduling: workers claim jobs strictly in job order from one shared queue. A worker may claim
//! the next job only while fewer than `prefetch` finished results wait for the consumer and fewer
//! than `prefetch + workers` jobs are claimed but not yet taken by the consumer. So every worker
//! can have one job in hand while up to `prefetch` finished results wait; when the consumer falls
//! behind, the workers stop once `prefetch` results are ready (jobs already running still finish,
//! so at most `prefetch + workers` results are ever held). Because jobs are claimed in order, the
//! job the consumer waits for is always either running or claimable, so the window never
//! deadlocks, whatever the completion order.
//!
//! Failure: an error from `make` is yielded at its place in the order and ends the iteration
//! (later results are dropped and the workers stop). A panic inside `make` is caught and becomes
//! an [`Error`] at that job's place; should every worker thread die anyway, the consumer gets an
//! error instead of waiting forever.
//!
//! Dropping the iterator tells the workers to stop and joins them: a worker finishes the `make`
//! call it is in (they cannot be interrupted) and claims nothing more.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

type Job<T> = Box<dyn FnOnce() -> Result<T> + Send>;

struct State<T> {
    /// Jobs not yet claimed, in order; the front one has index `next_job`.
    pending: std::collections::VecDeque<Job<T>>,
    /// Index of the next job a worker will claim.
    next_job: usize,
    /// Number of results the consumer has taken (= index of the one it waits for).
    consumed: usize,
    /// Finished results not yet taken, by job index.
    ready: BTreeMap<usize, Result<T>>,
    /// Set on drop or after an error: workers claim nothing more and discard what they finish.
    stopped: bool,
    /// Worker threads still running their loop.
    live_workers: usize,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled when a worker may be able to claim a job (consumer took one, or stop).
    work: Condvar,
    /// Signalled when a result is ready or a worker exits.
    done: Condvar,
    prefetch: usize,
    workers: usize,
}

impl<T> Shared<T> {
    /// The state lock. No user code runs under it, so poisoning would only come from a bug in
    /// this file; the data stays consistent then (every update is a single step), so it is used.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `make(job)` for each job on `workers` threads, keeping at most `prefetch` finished results
/// ahead of the consumer, and yields results IN JOB ORDER. Dropping the iterator stops the workers
/// promptly. See the module docs for the exact window and failure behaviour.
pub struct Prefetcher<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    handles: Vec<JoinHandle<()>>,
    total: usize,
    /// Set after the last result or an error: the iterator is fused.
    finished: bool,
    wait: Duration,
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Starts `min(workers, jobs.len())` worker threads (`workers` and `prefetch` are raised to at
    /// least 1). A thread that cannot be spawned is skipped; with none at all, the first call to
    /// `next` returns an error.
    pub fn new<J: Send + 'static>(
        jobs: Vec<J>,
        workers: usize,
        prefetch: usize,
        make: impl Fn(J) -> Result<T> + Send + Sync + 'static,
    ) -> Self {
        let total = jobs.len();
        let workers = workers.max(1);
        let prefetch = prefetch.max(1);
        let make = Arc::new(make);
        let pending = jobs
            .into_iter()
            .map(|job| {
                let make = Arc::clone(&make);
                Box::new(move || make(job)) as Job<T>
            })
            .collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending,
                next_job: 0,
                consumed: 0,
                ready: BTreeMap::new(),
                stopped: false,
                live_workers: 0,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            prefetch,
            workers,
        });
        let mut handles = Vec::new();
        for k in 0..workers.min(total) {
            // Count the worker before it starts so the consumer never sees a transient zero.
            shared.lock().live_workers += 1;
            let worker_shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("data-loader-{k}"))
                .spawn(move || worker_loop(worker_shared));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.lock().live_workers -= 1;
                    tracing::warn!("cannot spawn data-loader worker {k}: {e}");
                }
            }
        }
        Self {
            shared,
            handles,
            total,
            finished: total == 0,
            wait: Duration::ZERO,
        }
    }

    /// Number of worker threads actually running.
    pub fn workers(&self) -> usize {
        self.handles.len()
    }
}

impl<T: Send + 'static> Prefetcher<T> {
    /// Time the consumer spent blocked waiting for the next item (for the data-time metric).
    pub fn wait_time(&self) -> Duration {
        self.wait
    }
}

/// Marks a worker gone however its loop ends (return or an unexpected panic), so the consumer
/// never waits on a dead pool.
struct LiveGuard<'a, T>(&'a Shared<T>);

impl<T> Drop for LiveGuard<'_, T> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.live_workers -= 1;
        drop(st);
        self.0.done.notify_all();
    }
}

fn worker_loop<T>(shared: Arc<Shared<T>>) {
    let _guard = LiveGuard(&shared);
    let window = shared.prefetch + shared.workers;
    loop {
        let (index, job) = {
            let mut st = shared.lock();
            loop {
                if st.stopped || st.pending.is_empty() {
                    return;
                }
                let outstanding = st.next_job - st.consumed;
                if st.ready.len() < shared.prefetch && outstanding < window {
                    break;
                }
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            let job = st.pending.pop_front().expect("pending checked non-empty");
            let index = st.next_job;
            st.next_job += 1;
            (index, job)
        };
        let result = catch_unwind(AssertUnwindSafe(job))
            .unwrap_or_else(|payload| Err(panic_error(index, payload.as_ref())));
        let mut st = shared.lock();
        if st.stopped {
            return;
        }
        st.ready.insert(index, result);
        drop(st);
        shared.done.notify_all();
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

fn panic_error(index: usize, payload: &(dyn std::any::Any + Send)) -> Error {
    loader_error(
        index,
        format!("a data-loader worker panicked: {}", panic_message(payload)),
    )
}

/// The error type has no data-loader variant; an I/O error naming the job reads as
/// "cannot read data-loader job N: <reason>".
fn loader_error(index: usize, reason: String) -> Error {
    Error::io(
        format!("data-loader job {index}"),
        std::io::Error::other(reason),
    )
}

impl<T: Send + 'static> Iterator for Prefetcher<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.finished {
            return None;
        }
        let shared = Arc::clone(&self.shared);
        let mut st = shared.lock();
        let mut blocked_since: Option<Instant> = None;
        let item = loop {
            let index = st.consumed;
            if let Some(result) = st.ready.remove(&index) {
                st.consumed += 1;
                break result;
            }
            if st.live_workers == 0 {
                break Err(loader_error(
                    index,
                    "every data-loader worker exited before producing it".into(),
                ));
            }
            blocked_since.get_or_insert_with(Instant::now);
            st = shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        };
        if let Some(t0) = blocked_since {
            self.wait += t0.elapsed();
        }
        if item.is_err() || st.consumed == self.total {
            self.finished = true;
            st.stopped = true;
            st.ready.clear();
            st.pending.clear();
        }
        drop(st);
        shared.work.notify_all();
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.finished {
            return (0, Some(0));
        }
        let remaining = self.total - self.shared.lock().consumed;
        (0, Some(remaining))
    }
}

impl<T: Send + 'static> std::iter::FusedIterator for Prefetcher<T> {}

impl<T: Send + 'static> Drop for Prefetcher<T> {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.stopped = true;
            st.pending.clear();
            st.ready.clear();
        }
        self.shared.work.notify_all();
        self.shared.done.notify_all();
        for h in self.handles.drain(..) {
            // Worker panics are caught around `make`; a panic in the loop itself has already been
            // reported to the consumer through `live_workers`, so the join result carries nothing.
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::sleep;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn order_is_preserved_with_varying_durations() {
        let jobs: Vec<usize> = (0..40).collect();
        let it = Prefetcher::new(jobs, 4, 3, |i: usize| {
            // Later-in-window jobs often finish first.
            sleep(Duration::from_micros(((i * 7919) % 13) as u64 * 300));
            Ok(i * 10)
        });
        let got: Vec<usize> = it.map(|r| r.unwrap()).collect();
        assert_eq!(got, (0..40).map(|i| i * 10).collect::<Vec<_>>());
    }

    #[test]
    fn empty_and_single_worker() {
        let mut it = Prefetcher::new(Vec::<u8>::new(), 4, 2, |x: u8| Ok(x));
        assert!(it.next().is_none());
        assert_eq!(it.workers(), 0);
        let got: Vec<u8> = Prefetcher::new(vec![3u8, 1, 2], 0, 0, |x: u8| Ok(x + 1))
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(got, vec![4, 2, 3]);
    }

    #[test]
    fn lookahead_is_bounded() {
        for (workers, prefetch) in [(1, 1), (2, 3), (4, 2), (3, 8)] {
            let started = Arc::new(AtomicUsize::new(0));
            let s = Arc::clone(&started);
            let mut it = Prefetcher::new(
                (0..100).collect::<Vec<usize>>(),
                workers,
                prefetch,
                move |i| {
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok(i)
                },
            );
            // The workers do run ahead (poll, so a loaded machine cannot fail this), then give
            // them ample time to run as far ahead as they are allowed.
            let t0 = Instant::now();
            while started.load(Ordering::SeqCst) < prefetch && t0.elapsed() < Duration::from_secs(5)
            {
                sleep(ms(1));
            }
            sleep(ms(100));
            let before = started.load(Ordering::SeqCst);
            assert!(
                before <= prefetch + workers,
                "w={workers} p={prefetch}: {before}"
            );
            assert!(before >= prefetch, "w={workers} p={prefetch}: {before}");
            assert_eq!(it.next().unwrap().unwrap(), 0);
            sleep(ms(50));
            let after = started.load(Ordering::SeqCst);
            assert!(
                after <= 1 + prefetch + workers,
                "w={workers} p={prefetch}: {after}"
            );
            let rest: Vec<usize> = it.map(|r| r.unwrap()).collect();
            assert_eq!(rest, (1..100).collect::<Vec<_>>());
            assert_eq!(started.load(Ordering::SeqCst), 100);
        }
    }

    #[test]
    fn error_is_yielded_in_order_and_ends_iteration() {
        let it = Prefetcher::new((0..20).collect::<Vec<usize>>(), 3, 4, |i| {
            if i == 7 {
                Err(Error::Image {
                    path: format!("img{i}.png").into(),
                    reason: "bad".into(),
                })
            } else {
                sleep(Duration::from_micros(200));
                Ok(i)
            }
        });
        let items: Vec<Result<usize>> = it.collect();
        assert_eq!(items.len(), 8);
        for (i, r) in items[..7].iter().enumerate() {
            assert_eq!(*r.as_ref().unwrap(), i);
        }
        let err = items[7].as_ref().unwrap_err().to_string();
        assert!(err.contains("img7.png"), "{err}");
    }

    #[test]
    fn panic_becomes_an_error_not_a_hang() {
        let mut it = Prefetcher::new((0..10).collect::<Vec<usize>>(), 2, 2, |i| {
            if i == 3 {
                panic!("boom at {i}");
            }
            Ok(i)
        });
        for i in 0..3 {
            assert_eq!(it.next().unwrap().unwrap(), i);
        }
        let err = it.next().unwrap().unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            chain.contains("job 3") && chain.contains("boom at 3"),
            "{chain}"
        );
        assert!(it.next().is_none());
    }

    #[test]
    fn early_drop_stops_workers_promptly() {
        let started = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&started);
        let mut it = Prefetcher::new((0..10_000).collect::<Vec<usize>>(), 4, 4, move |i| {
            s.fetch_add(1, Ordering::SeqCst);
            sleep(ms(5));
            Ok(vec![i; 1000])
        });
        assert_eq!(it.next().unwrap().unwrap()[0], 0);
        assert_eq!(it.next().unwrap().unwrap()[0], 1);
        let t0 = Instant::now();
        drop(it);
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(1), "drop took {took:?}");
        let n = started.load(Ordering::SeqCst);
        sleep(ms(50));
        // Joined: nothing runs after the drop returned.
        assert_eq!(started.load(Ordering::SeqCst), n);
        assert!(n <= 2 + 4 + 4, "{n}");
    }

    #[test]
    fn wait_time_tracks_slow_producers_only() {
        // Slow producer, fast consumer: the consumer waits for nearly every item.
        let mut slow = Prefetcher::new((0..6).collect::<Vec<usize>>(), 1, 2, |i| {
            sleep(ms(20));
            Ok(i)
        });
        assert_eq!(slow.wait_time(), Duration::ZERO);
        for r in slow.by_ref() {
            r.unwrap();
        }
        assert!(slow.wait_time() >= ms(60), "{:?}", slow.wait_time());

        // Fast producers, slow consumer: after the first item everything is ready in time.
        let mut fast = Prefetcher::new((0..10).collect::<Vec<usize>>(), 2, 4, Ok);
        sleep(ms(50));
        for r in fast.by_ref() {
            r.unwrap();
            sleep(ms(20));
        }
        assert!(fast.wait_time() < ms(20), "{:?}", fast.wait_time());
    }
}
