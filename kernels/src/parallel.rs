//! A small fork-join pool for data-parallel loops with microsecond dispatch.
//!
//! A decode step runs a few hundred short parallel loops (one per matrix product),
//! each taking tens of microseconds: spawning threads or waking sleeping ones for
//! each would cost more than the work. Workers here spin briefly on a generation
//! counter before parking, so back-to-back loops start within a microsecond or two,
//! while an idle pool (a chat waiting for the user) sleeps and costs nothing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(200);

type Task<'a> = dyn Fn(usize) + Sync + 'a;

struct Shared {
    /// Bumped once per job; workers run a job when they see a new value.
    generation: AtomicUsize,
    /// Lifetime-erased pointer to the current job; valid while `pending > 0`.
    task: Mutex<Option<TaskPtr>>,
    /// Workers that have not yet finished the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleeping: Vec<AtomicBool>,
}

#[derive(Clone, Copy)]
struct TaskPtr(*const Task<'static>);
// SAFETY: the pointee is `Sync` and outlives every use (see `ThreadPool::run`).
unsafe impl Send for TaskPtr {}

/// A pool of `n - 1` worker threads plus the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<(JoinHandle<()>, Thread)>,
    /// Serialises `run` calls from several threads sharing the pool.
    running: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadPool({} threads)", self.threads())
    }
}

/// A job panicked in one of the pool's threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPanicked;

impl std::fmt::Display for JobPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a parallel job panicked")
    }
}

impl std::error::Error for JobPanicked {}

impl ThreadPool {
    /// A pool that runs jobs on `threads` threads in all (at least 1), the caller
    /// being one of them.
    pub fn new(threads: usize) -> ThreadPool {
        let n_workers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            task: Mutex::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleeping: (0..n_workers).map(|_| AtomicBool::new(false)).collect(),
        });
        let workers = (0..n_workers)
            .map(|i| {
                let shared = Arc::clone(&shared);
                let handle = thread::Builder::new()
                    .name(format!("tandem-dense-{}", i + 1))
                    .spawn(move || worker_loop(&shared, i))
                    .expect("failed to spawn a pool thread");
                let t = handle.thread().clone();
                (handle, t)
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            running: Mutex::new(()),
        }
    }

    /// Number of threads a job runs on, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `task(i)` for every thread index `i` in `0..threads()`, the caller
    /// running index 0, and returns when all are done.
    pub fn run(&self, task: &(dyn Fn(usize) + Sync)) -> Result<(), JobPanicked> {
        if self.workers.is_empty() {
            return catch_unwind(AssertUnwindSafe(|| task(0))).map_err(|_| JobPanicked);
        }
        let _guard = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: erasing the lifetime is sound because this function does not return
        // before every worker has finished with the pointer (`pending` reaches 0).
        let ptr: *const Task<'static> = unsafe { std::mem::transmute(task as *const Task<'_>) };
        *self.shared.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(TaskPtr(ptr));
        self.shared.panicked.store(false, Ordering::SeqCst);
        self.shared
            .pending
            .store(self.workers.len(), Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        for (i, (_, t)) in self.workers.iter().enumerate() {
            if self.shared.sleeping[i].load(Ordering::SeqCst) {
                t.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| task(0)));
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        *self.shared.task.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if mine.is_err() || self.shared.panicked.load(Ordering::SeqCst) {
            return Err(JobPanicked);
        }
        Ok(())
    }
}

fn worker_loop(shared: &Shared, index: usize) {
    let mut seen = 0usize;
    loop {
        let spin_start = Instant::now();
        let mut current = shared.generation.load(Ordering::Acquire);
        while current == seen && !shared.shutdown.load(Ordering::Relaxed) {
            if spin_start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                shared.sleeping[index].store(true, Ordering::SeqCst);
                if shared.generation.load(Ordering::SeqCst) == seen
                    && !shared.shutdown.load(Ordering::SeqCst)
                {
                    thread::park_timeout(Duration::from_millis(50));
                }
                shared.sleeping[index].store(false, Ordering::SeqCst);
            }
            current = shared.generation.load(Ordering::Acquire);
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        seen = current;
        let task = *shared.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(TaskPtr(ptr)) = task {
            // SAFETY: `run` keeps the task alive until `pending` drops to zero below.
            let task = unsafe { &*ptr };
            if catch_unwind(AssertUnwindSafe(|| task(index + 1))).is_err() {
                shared.panicked.store(true, Ordering::SeqCst);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for (handle, t) in self.workers.drain(..) {
            t.unpark();
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_per_job() {
        let pool = ThreadPool::new(3);
        for _ in 0..1000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::SeqCst);
            })
            .expect("no panic");
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
        }
    }

    #[test]
    fn a_panic_is_an_error_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = pool.run(&|i| {
            if i == 1 {
                panic!("boom");
            }
        });
        assert_eq!(r, Err(JobPanicked));
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::SeqCst);
        })
        .expect("pool still works");
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_parked_pool_wakes_up() {
        let pool = ThreadPool::new(2);
        thread::sleep(Duration::from_millis(20));
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::SeqCst);
        })
        .expect("no panic");
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
