//! The scheduler: runs every mailbox × protocol on its interval.
//!
//! One task per mailbox and protocol, so there is never more than one connection per
//! mailbox and protocol (Exchange allows three concurrent SMTP connections per mailbox;
//! a monitor must never be the cause of `432 4.3.2`). Slots are fixed at
//! `first + n × interval` and never drift; each run starts a little after its slot
//! (jitter) and a run that overlaps its next slot skips it rather than bursting. A global
//! semaphore bounds the probes running at once. First runs are spread over the interval
//! by a stable hash of the mailbox and protocol, so a start does not log in everywhere at
//! the same second and a restart keeps the same rhythm.
//!
//! What a run does is the [`Execute`] implementation's business (the service probes and
//! records; tests count calls), and all waiting goes through `tokio::time`.

use crate::Protocol;
use crate::config::Schedule;
use crate::status::Key;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// One scheduled probe: what to run and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job<T> {
    pub mailbox: String,
    pub protocol: Protocol,
    pub interval: Duration,
    /// What the executor needs (the service puts the mailbox and credential here).
    pub payload: T,
}

impl<T> Job<T> {
    pub fn key(&self) -> Key {
        (self.mailbox.clone(), self.protocol)
    }
}

/// Runs one job to completion (probe, classify, record).
pub trait Execute<T>: Send + Sync + 'static {
    fn execute(&self, job: Arc<Job<T>>) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// FNV-1a: a hash that is the same in every build and on every machine, so first-run
/// offsets (and shard assignment) do not change with the compiler.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn key_hash(mailbox: &str, protocol: Protocol, salt: u64) -> u64 {
    let mut bytes = Vec::with_capacity(mailbox.len() + 16);
    bytes.extend_from_slice(mailbox.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(protocol.as_str().as_bytes());
    bytes.extend_from_slice(&salt.to_le_bytes());
    stable_hash(&bytes)
}

/// `fraction` of `span`, where `fraction` is `h / 2^64`.
fn portion(span: Duration, h: u64) -> Duration {
    let nanos = span.as_nanos().min(u128::from(u64::MAX)) as u64;
    Duration::from_nanos(((u128::from(nanos) * u128::from(h)) >> 64) as u64)
}

/// How long after start (or after being added) a job first runs.
pub fn first_offset(mailbox: &str, protocol: Protocol, spread: Duration) -> Duration {
    portion(spread, key_hash(mailbox, protocol, 0))
}

/// How long after its `n`th slot a job starts.
fn jitter(mailbox: &str, protocol: Protocol, n: u64, max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    portion(max, key_hash(mailbox, protocol, n.wrapping_add(1)))
}

struct Shared<T> {
    executor: Arc<dyn Execute<T>>,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
}

/// Owns the per-job tasks.
pub struct Scheduler<T> {
    executor: Arc<dyn Execute<T>>,
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    stop_tx: watch::Sender<bool>,
    jobs: HashMap<Key, watch::Sender<Arc<Job<T>>>>,
    tasks: JoinSet<()>,
    /// Held during a run: a key removed and re-added by two quick reloads gets a new task,
    /// which must still wait for the old one's connection to end.
    running: HashMap<Key, Arc<tokio::sync::Mutex<()>>>,
}

impl<T: Send + Sync + 'static> Scheduler<T> {
    pub fn new(executor: Arc<dyn Execute<T>>, max_concurrent: usize) -> Scheduler<T> {
        let (stop_tx, _) = watch::channel(false);
        Scheduler {
            executor,
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            stop_tx,
            jobs: HashMap::new(),
            tasks: JoinSet::new(),
            running: HashMap::new(),
        }
    }

    /// Number of scheduled jobs.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Makes the schedule exactly `jobs`. Unchanged jobs keep their slots; changed ones
    /// take the new settings from their next run; removed ones stop (a run in flight
    /// finishes, and its result is dropped by the board).
    pub fn apply(&mut self, jobs: Vec<Job<T>>, schedule: &Schedule)
    where
        T: PartialEq,
    {
        self.resize(schedule.max_concurrent_probes);
        let mut wanted: HashMap<Key, Job<T>> = jobs.into_iter().map(|j| (j.key(), j)).collect();
        // Dropping a sender ends its task at its next wait.
        self.jobs.retain(|key, _| wanted.contains_key(key));
        for (key, tx) in &self.jobs {
            if let Some(job) = wanted.remove(key)
                && **tx.borrow() != job
            {
                let _ = tx.send(Arc::new(job));
            }
        }
        let now = Instant::now();
        for (key, job) in wanted {
            let spread = schedule.startup_spread.unwrap_or(job.interval);
            let first = now + first_offset(&job.mailbox, job.protocol, spread);
            let (tx, rx) = watch::channel(Arc::new(job));
            let lock = self.running.entry(key.clone()).or_default().clone();
            let shared = Shared {
                executor: self.executor.clone(),
                permits: self.permits.clone(),
                stop: self.stop_tx.subscribe(),
            };
            self.tasks
                .spawn(job_loop(rx, shared, lock, first, schedule.jitter));
            self.jobs.insert(key, tx);
        }
        // Forget run locks nobody holds any more.
        let jobs = &self.jobs;
        self.running
            .retain(|key, lock| jobs.contains_key(key) || Arc::strong_count(lock) > 1);
        while self.tasks.try_join_next().is_some() {}
    }

    fn resize(&mut self, max: usize) {
        if max > self.max_concurrent {
            self.permits.add_permits(max - self.max_concurrent);
        } else if max < self.max_concurrent {
            // Permits in use are taken back as they are returned.
            let shrink = self.max_concurrent - max;
            let permits = self.permits.clone();
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many(shrink as u32).await {
                    p.forget();
                }
            });
        }
        self.max_concurrent = max;
    }

    /// Stops starting runs, then waits up to `grace` for the runs in flight. Returns how
    /// many were still running when the grace period ended (they are cancelled).
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        let _ = self.stop_tx.send(true);
        self.jobs.clear();
        let deadline = Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return 0,
                Err(_) => {
                    let left = self.tasks.len();
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    return left;
                }
            }
        }
    }
}

async fn job_loop<T: Send + Sync + 'static>(
    mut rx: watch::Receiver<Arc<Job<T>>>,
    mut shared: Shared<T>,
    lock: Arc<tokio::sync::Mutex<()>>,
    first: Instant,
    max_jitter: Duration,
) {
    let mut slot = first;
    let mut n: u64 = 0;
    loop {
        let job = rx.borrow_and_update().clone();
        let start = slot + jitter(&job.mailbox, job.protocol, n, max_jitter);
        tokio::select! {
            _ = tokio::time::sleep_until(start) => {}
            changed = rx.changed() => {
                if changed.is_err() {
                    return; // removed from the config
                }
                continue; // new settings; same slot
            }
            _ = shared.stop.wait_for(|s| *s) => return,
        }
        let permit = tokio::select! {
            p = shared.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shared.stop.wait_for(|s| *s) => return,
        };
        // A removal noticed while waiting for a permit: do not start.
        if rx.has_changed().is_err() {
            return;
        }
        let job = rx.borrow_and_update().clone();
        {
            let _running = lock.lock().await;
            shared.executor.execute(job.clone()).await;
        }
        drop(permit);
        // Next slot strictly after now: a run that took longer than the interval (or
        // waited long for a permit) skips the slots it overlapped instead of bursting.
        let interval = job.interval.max(Duration::from_millis(1));
        let now = Instant::now();
        slot += interval;
        n += 1;
        if slot <= now {
            let behind = now - slot;
            let skip = (behind.as_nanos() / interval.as_nanos()) as u32 + 1;
            slot += interval * skip;
            n += u64::from(skip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records when each job ran and how many ran at once; each run takes `busy`.
    struct Recorder {
        start: Instant,
        busy: Duration,
        runs: Mutex<Vec<(String, Protocol, Duration)>>,
        now_running: AtomicUsize,
        max_running: AtomicUsize,
        per_key_running: Mutex<HashMap<Key, usize>>,
        max_per_key: AtomicUsize,
    }

    impl Recorder {
        fn new(busy: Duration) -> Arc<Recorder> {
            Arc::new(Recorder {
                start: Instant::now(),
                busy,
                runs: Mutex::new(Vec::new()),
                now_running: AtomicUsize::new(0),
                max_running: AtomicUsize::new(0),
                per_key_running: Mutex::new(HashMap::new()),
                max_per_key: AtomicUsize::new(0),
            })
        }

        fn runs_of(&self, mailbox: &str) -> Vec<Duration> {
            self.runs
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.0 == mailbox)
                .map(|r| r.2)
                .collect()
        }
    }

    impl Execute<()> for Arc<Recorder> {
        fn execute(&self, job: Arc<Job<()>>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
            let me = self.clone();
            Box::pin(async move {
                let at = Instant::now() - me.start;
                me.runs
                    .lock()
                    .unwrap()
                    .push((job.mailbox.clone(), job.protocol, at));
                let n = me.now_running.fetch_add(1, Ordering::SeqCst) + 1;
                me.max_running.fetch_max(n, Ordering::SeqCst);
                {
                    let mut per = me.per_key_running.lock().unwrap();
                    let c = per.entry(job.key()).or_default();
                    *c += 1;
                    me.max_per_key.fetch_max(*c, Ordering::SeqCst);
                }
                tokio::time::sleep(me.busy).await;
                *me.per_key_running
                    .lock()
                    .unwrap()
                    .entry(job.key())
                    .or_default() -= 1;
                me.now_running.fetch_sub(1, Ordering::SeqCst);
            })
        }
    }

    fn job(name: &str, protocol: Protocol, interval: Duration) -> Job<()> {
        Job {
            mailbox: name.to_string(),
            protocol,
            interval,
            payload: (),
        }
    }

    fn schedule(max: usize, jitter: Duration) -> Schedule {
        Schedule {
            max_concurrent_probes: max,
            startup_spread: None,
            jitter,
            ..Schedule::default()
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn first_runs_are_spread_over_the_interval() {
        let rec = Recorder::new(Duration::from_millis(100));
        let mut s = Scheduler::new(Arc::new(rec.clone()) as Arc<dyn Execute<()>>, 1000);
        let jobs: Vec<_> = (0..200)
            .map(|i| job(&format!("m{i}"), Protocol::Imap, MIN))
            .collect();
        s.apply(jobs, &schedule(1000, Duration::ZERO));
        tokio::time::sleep(MIN - Duration::from_millis(1)).await;
        let runs = rec.runs.lock().unwrap().clone();
        assert_eq!(runs.len(), 200, "every job ran once within its interval");
        // No herd: each 6 s tenth of the minute holds roughly a tenth of the first runs.
        let mut buckets = [0usize; 10];
        for r in &runs {
            buckets[(r.2.as_secs_f64() / 6.0) as usize] += 1;
        }
        for b in buckets {
            assert!((5..=40).contains(&b), "uneven spread: {buckets:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slots_do_not_drift_and_jitter_stays_within_bounds() {
        let rec = Recorder::new(Duration::from_millis(700));
        let mut s = Scheduler::new(Arc::new(rec.clone()) as Arc<dyn Execute<()>>, 10);
        s.apply(
            vec![job("a", Protocol::Smtp, Duration::from_secs(10))],
            &schedule(10, Duration::from_secs(1)),
        );
        tokio::time::sleep(Duration::from_secs(1000)).await;
        let runs = rec.runs_of("a");
        assert!(runs.len() >= 99, "{}", runs.len());
        let first = runs[0];
        let base = first - jitter("a", Protocol::Smtp, 0, Duration::from_secs(1));
        for (n, at) in runs.iter().enumerate() {
            let slot = base + Duration::from_secs(10) * n as u32;
            // Each run starts within [slot, slot + jitter): a 700 ms run never pushes the
            // next one later, however many runs came before.
            assert!(
                *at >= slot && *at < slot + Duration::from_secs(1),
                "run {n} at {at:?}, slot {slot:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn global_limit_and_one_connection_per_mailbox_and_protocol() {
        // Runs take longer than the interval: a naive timer would overlap them.
        let rec = Recorder::new(Duration::from_secs(25));
        let mut s = Scheduler::new(Arc::new(rec.clone()) as Arc<dyn Execute<()>>, 3);
        let mut jobs = Vec::new();
        for i in 0..10 {
            for p in [Protocol::Imap, Protocol::Pop3, Protocol::Smtp] {
                jobs.push(job(&format!("m{i}"), p, Duration::from_secs(10)));
            }
        }
        s.apply(jobs, &schedule(3, Duration::ZERO));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(rec.max_running.load(Ordering::SeqCst), 3);
        assert_eq!(rec.max_per_key.load(Ordering::SeqCst), 1);
        // Everyone got a turn: the semaphore is fair.
        for i in 0..10 {
            assert!(!rec.runs_of(&format!("m{i}")).is_empty(), "m{i} starved");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn apply_removes_changes_and_adds_jobs() {
        let rec = Recorder::new(Duration::from_millis(10));
        let mut s = Scheduler::new(Arc::new(rec.clone()) as Arc<dyn Execute<()>>, 10);
        let sch = schedule(10, Duration::ZERO);
        s.apply(
            vec![
                job("stays", Protocol::Imap, Duration::from_secs(10)),
                job("goes", Protocol::Imap, Duration::from_secs(10)),
            ],
            &sch,
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        s.apply(
            vec![
                job("stays", Protocol::Imap, Duration::from_secs(5)),
                job("new", Protocol::Pop3, Duration::from_secs(10)),
            ],
            &sch,
        );
        let goes_before = rec.runs_of("goes").len();
        let stays_before = rec.runs_of("stays").len();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(rec.runs_of("goes").len(), goes_before, "a removed job ran");
        let stays = rec.runs_of("stays").len() - stays_before;
        assert!(
            (11..=13).contains(&stays),
            "new interval not used: {stays} runs in 60 s"
        );
        assert!(rec.runs_of("new").len() >= 5);
        assert_eq!(s.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_runs_in_flight_within_grace() {
        let rec = Recorder::new(Duration::from_secs(3));
        let mut s = Scheduler::new(Arc::new(rec.clone()) as Arc<dyn Execute<()>>, 10);
        let mut sch = schedule(10, Duration::ZERO);
        sch.startup_spread = Some(Duration::from_millis(1));
        s.apply(
            vec![job("a", Protocol::Imap, Duration::from_secs(60))],
            &sch,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rec.now_running.load(Ordering::SeqCst), 1);
        let left = s.shutdown(Duration::from_secs(10)).await;
        assert_eq!(left, 0);
        assert_eq!(
            rec.now_running.load(Ordering::SeqCst),
            0,
            "run was cut short"
        );

        // A run longer than the grace period is cancelled.
        let rec = Recorder::new(Duration::from_secs(300));
        let mut s = Scheduler::new(Arc::new(rec.clone()) as Arc<dyn Execute<()>>, 10);
        s.apply(
            vec![job("b", Protocol::Imap, Duration::from_secs(600))],
            &sch,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(s.shutdown(Duration::from_secs(5)).await, 1);
    }

    #[test]
    fn stable_hash_is_fnv1a() {
        // Published FNV-1a 64 test vectors: the hash must never change between builds.
        assert_eq!(stable_hash(b""), 0xcbf29ce484222325);
        assert_eq!(stable_hash(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x85944171f73967e8);
    }
}
