//! The scheduler: runs every mailbox × protocol on its interval.
//!
//! Never more than one connection per mailbox and protocol (Exchange allows three
//! concurrent SMTP connections per mailbox; a monitor must never be the cause of
//! `432 4.3.2`). Slots are fixed at `first + n × interval` and never drift; each run
//! starts a little after its slot (jitter) and a run that overlaps its next slot skips it
//! rather than bursting. A global semaphore bounds the probes running at once. First runs
//! are spread over the interval by a stable hash of the mailbox and protocol, so a start
//! does not log in everywhere at the same second and a restart keeps the same rhythm.
//!
//! One driver task holds every job in a timer queue (a binary heap of start times) and
//! spawns a task per run only when the run is due: an idle job costs a map entry and a
//! heap entry (~170 bytes), not a parked task with its own timer and channel (~1.4 KiB at
//! 30,000 jobs, issue 12).
//!
//! What a run does is the [`Execute`] implementation's business (the service probes and
//! records; tests count calls), and all waiting goes through `tokio::time`.

use crate::Protocol;
use crate::config::Schedule;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// A mailbox and one of its protocols: the unit the scheduler probes, and a row of the
/// status board and of `/metrics` (`mailbox`, `protocol` labels).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The mailbox's name in the config (`mailboxes:` key), shared by every copy.
    pub mailbox: Arc<str>,
    pub protocol: Protocol,
}

impl Key {
    /// The key of `mailbox` (its name in the config) on `protocol`.
    pub fn new(mailbox: &str, protocol: Protocol) -> Key {
        Key {
            mailbox: Arc::from(mailbox),
            protocol,
        }
    }
}

impl fmt::Display for Key {
    /// `mailbox/protocol`, as logs and the transcript URL name a row.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.mailbox, self.protocol.as_str())
    }
}

/// One scheduled probe: what to run and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job<T> {
    /// The mailbox and protocol: at most one run of a key is in flight.
    pub key: Key,
    /// Slot spacing: runs start at `first + n × interval` (plus jitter).
    pub interval: Duration,
    /// What the executor needs (the service puts the mailbox and credential here).
    pub payload: T,
}

impl<T> Job<T> {
    /// A copy of the job's key (an `Arc` clone).
    pub fn key(&self) -> Key {
        self.key.clone()
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

/// Owns the driver task, which owns the jobs and their runs.
pub struct Scheduler<T> {
    executor: Arc<dyn Execute<T>>,
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    /// `Some(grace)` once shutdown began.
    stop_tx: watch::Sender<Option<Duration>>,
    commands: Option<mpsc::UnboundedSender<Apply<T>>>,
    driver: Option<JoinHandle<usize>>,
    len: usize,
}

/// A new set of jobs for the driver.
struct Apply<T> {
    jobs: HashMap<Key, Job<T>>,
    jitter: Duration,
    startup_spread: Option<Duration>,
    at: Instant,
}

impl<T: Send + Sync + 'static> Scheduler<T> {
    /// A scheduler that runs jobs with `executor`, at most `max_concurrent` at once. Its
    /// driver task starts with the first [`Scheduler::apply`].
    pub fn new(executor: Arc<dyn Execute<T>>, max_concurrent: usize) -> Scheduler<T> {
        let (stop_tx, _) = watch::channel(None);
        Scheduler {
            executor,
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            stop_tx,
            commands: None,
            driver: None,
            len: 0,
        }
    }

    /// Number of scheduled jobs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No job scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the schedule exactly `jobs`. Unchanged jobs keep their slots; changed ones
    /// take the new settings from their next run; removed ones stop (a run in flight
    /// finishes, and its result is dropped by the board). Must be called inside a Tokio
    /// runtime (the first call starts the driver task).
    pub fn apply(&mut self, jobs: Vec<Job<T>>, schedule: &Schedule)
    where
        T: PartialEq,
    {
        self.resize(schedule.max_concurrent_probes);
        let jobs: HashMap<Key, Job<T>> = jobs.into_iter().map(|j| (j.key(), j)).collect();
        self.len = jobs.len();
        let apply = Apply {
            jobs,
            jitter: schedule.jitter,
            startup_spread: schedule.startup_spread,
            at: Instant::now(),
        };
        let commands = self.commands.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let driver = Driver {
                executor: self.executor.clone(),
                permits: self.permits.clone(),
                stop: self.stop_tx.subscribe(),
                jitter: Duration::ZERO,
                entries: HashMap::new(),
                queue: BinaryHeap::new(),
                runs: JoinSet::new(),
                in_flight: HashMap::new(),
            };
            self.driver = Some(tokio::spawn(driver.drive(rx)));
            tx
        });
        // The driver ends only after shutdown, which takes `self`.
        let _ = commands.send(apply);
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
        let _ = self.stop_tx.send(Some(grace));
        match self.driver.take() {
            Some(driver) => driver.await.unwrap_or(0),
            None => 0,
        }
    }
}

impl<T> Drop for Scheduler<T> {
    /// Dropped without `shutdown`: runs in flight are cancelled with the driver.
    fn drop(&mut self) {
        if let Some(driver) = &self.driver {
            driver.abort();
        }
    }
}

/// One job in the driver's hands.
struct Entry<T> {
    /// The latest settings; a run uses the job it started with.
    job: Arc<Job<T>>,
    /// The current slot (`first + n × interval`); the run starts at slot + jitter.
    slot: Instant,
    n: u64,
    /// Bumped when the job is removed and added again while a run is in flight, so the
    /// queue's older entry for it is ignored.
    generation: u64,
    /// Set while a run of this key is in flight: the next one waits for it.
    running: Option<Arc<AtomicBool>>,
    /// Removed from the config while a run was in flight: forgotten when it ends.
    removed: bool,
    /// A re-added job came due while the old run was still in flight: start when it ends.
    due_while_running: bool,
}

impl<T> Entry<T> {
    /// When the current slot's run starts: `max_jitter` is the schedule's, so a reload
    /// that changes it applies to every job from its next run.
    fn start(&self, max_jitter: Duration) -> Instant {
        let key = &self.job.key;
        self.slot + jitter(&key.mailbox, key.protocol, self.n, max_jitter)
    }
}

/// What woke the driver.
enum Event<T> {
    Stop(Duration),
    Apply(Apply<T>),
    Finished(tokio::task::Id),
    Due,
}

/// What a finished run hands back to the driver.
struct Ran {
    key: Key,
    generation: u64,
    interval: Duration,
}

struct Driver<T> {
    executor: Arc<dyn Execute<T>>,
    permits: Arc<Semaphore>,
    stop: watch::Receiver<Option<Duration>>,
    /// `scheduler.jitter` of the schedule applied last.
    jitter: Duration,
    entries: HashMap<Key, Entry<T>>,
    /// Start times, earliest first; an item whose generation no longer matches its entry
    /// (or whose entry is gone) is skipped when it comes up.
    queue: BinaryHeap<Reverse<(Instant, u64, Key)>>,
    runs: JoinSet<()>,
    /// Which job each run task belongs to, so that a run that panicked still frees its
    /// job for the next slot.
    in_flight: HashMap<tokio::task::Id, Ran>,
}

impl<T: Send + Sync + PartialEq + 'static> Driver<T> {
    /// Returns how many runs were cut short at shutdown.
    async fn drive(mut self, mut commands: mpsc::UnboundedReceiver<Apply<T>>) -> usize {
        let grace = loop {
            let next = self.next_start();
            // The branches only say what happened: the handling below needs all of `self`.
            let event = tokio::select! {
                biased;
                stop = self.stop.wait_for(Option::is_some) => {
                    Event::Stop(stop.ok().and_then(|s| *s).unwrap_or_default())
                }
                command = commands.recv() => match command {
                    Some(apply) => Event::Apply(apply),
                    // The scheduler was dropped.
                    None => Event::Stop(Duration::ZERO),
                },
                Some(done) = self.runs.join_next_with_id(), if !self.runs.is_empty() => {
                    Event::Finished(match &done {
                        Ok((id, ())) => *id,
                        Err(e) => e.id(),
                    })
                }
                () = sleep_until(next), if next.is_some() => Event::Due,
            };
            match event {
                Event::Stop(grace) => break grace,
                Event::Apply(apply) => self.apply(apply),
                Event::Finished(id) => {
                    if let Some(ran) = self.in_flight.remove(&id) {
                        self.finished(ran);
                    }
                }
                Event::Due => self.start_due(),
            }
        };
        self.entries.clear();
        self.queue.clear();
        let deadline = Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, self.runs.join_next()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return 0,
                Err(_) => {
                    let left = self.runs.len();
                    self.runs.abort_all();
                    while self.runs.join_next().await.is_some() {}
                    return left;
                }
            }
        }
    }

    /// The earliest start still wanted, dropping stale queue items on the way.
    fn next_start(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, generation, key))) = self.queue.peek() {
            match self.entries.get(key) {
                Some(e) if e.generation == *generation && !e.removed => return Some(*at),
                _ => {
                    self.queue.pop();
                }
            }
        }
        None
    }

    fn apply(&mut self, apply: Apply<T>) {
        let Apply {
            mut jobs,
            jitter,
            startup_spread,
            at,
        } = apply;
        self.jitter = jitter;
        // Removed jobs: forgotten now, or when their run in flight ends.
        self.entries.retain(|key, e| {
            if jobs.contains_key(key) {
                return true;
            }
            match &e.running {
                Some(cancel) => {
                    // A run still waiting for a permit does not start.
                    cancel.store(true, Ordering::Relaxed);
                    e.removed = true;
                    true
                }
                None => false,
            }
        });
        for e in self.entries.values_mut() {
            if let Some(job) = jobs.remove(&e.job.key) {
                if e.removed {
                    // Added back while its old run is in flight: a fresh schedule, whose
                    // first run still waits for the old connection to end.
                    e.removed = false;
                    e.generation += 1;
                    e.slot = first_slot(&job, startup_spread, at);
                    e.n = 0;
                    e.due_while_running = false;
                    e.job = Arc::new(job);
                    self.queue
                        .push(Reverse((e.start(jitter), e.generation, e.job.key.clone())));
                } else if *e.job != job {
                    // New settings from the next run on; the slot stays.
                    e.job = Arc::new(job);
                }
            }
        }
        for (key, job) in jobs {
            let e = Entry {
                slot: first_slot(&job, startup_spread, at),
                job: Arc::new(job),
                n: 0,
                generation: 0,
                running: None,
                removed: false,
                due_while_running: false,
            };
            self.queue.push(Reverse((e.start(jitter), 0, key.clone())));
            self.entries.insert(key, e);
        }
    }

    /// Starts every job whose start time has come.
    fn start_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _, _))) = self.queue.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, generation, key))) = self.queue.pop() else {
                break;
            };
            let Some(e) = self.entries.get_mut(&key) else {
                continue;
            };
            if e.generation != generation || e.removed {
                continue;
            }
            if e.running.is_some() {
                e.due_while_running = true;
            } else {
                self.spawn_run(&key);
            }
        }
    }

    fn spawn_run(&mut self, key: &Key) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        let cancel = Arc::new(AtomicBool::new(false));
        e.running = Some(cancel.clone());
        e.due_while_running = false;
        let job = e.job.clone();
        let ran = Ran {
            key: key.clone(),
            generation: e.generation,
            interval: job.interval,
        };
        let executor = self.executor.clone();
        let permits = self.permits.clone();
        let mut stop = self.stop.clone();
        let handle = self.runs.spawn(async move {
            let permit = tokio::select! {
                p = permits.acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = stop.wait_for(Option::is_some) => return,
            };
            // Removed from the config while waiting for a permit: do not start.
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            executor.execute(job).await;
            drop(permit);
        });
        self.in_flight.insert(handle.id(), ran);
    }

    /// A run ended (or panicked): free its job and queue its next slot.
    fn finished(&mut self, ran: Ran) {
        let Some(e) = self.entries.get_mut(&ran.key) else {
            return;
        };
        e.running = None;
        if e.removed {
            self.entries.remove(&ran.key);
            return;
        }
        if e.generation != ran.generation {
            // Re-added during the run: its own first slot is queued already.
            if e.due_while_running {
                self.spawn_run(&ran.key);
            }
            return;
        }
        // Next slot strictly after now: a run that took longer than the interval (or
        // waited long for a permit) skips the slots it overlapped instead of bursting.
        let interval = ran.interval.max(Duration::from_millis(1));
        let now = Instant::now();
        e.slot += interval;
        e.n += 1;
        if e.slot <= now {
            let behind = now - e.slot;
            let skip = (behind.as_nanos() / interval.as_nanos()) as u32 + 1;
            e.slot += interval * skip;
            e.n += u64::from(skip);
        }
        self.queue
            .push(Reverse((e.start(self.jitter), e.generation, ran.key)));
    }
}

fn first_slot<T>(job: &Job<T>, startup_spread: Option<Duration>, at: Instant) -> Instant {
    let spread = startup_spread.unwrap_or(job.interval);
    at + first_offset(&job.key.mailbox, job.key.protocol, spread)
}

/// Sleeps until `at`; never called with `None` (the select guard prevents it).
async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
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
                    .push((job.key.mailbox.to_string(), job.key.protocol, at));
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
            key: Key::new(name, protocol),
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
    async fn a_job_removed_and_added_back_during_its_run_waits_for_that_run() {
        // Runs take 20 s; the job is removed and added back (two quick reloads) while one
        // is in flight, and its new first slot comes before that run ends.
        let rec = Recorder::new(Duration::from_secs(20));
        let mut s = Scheduler::new(Arc::new(rec.clone()) as Arc<dyn Execute<()>>, 10);
        let mut sch = schedule(10, Duration::ZERO);
        sch.startup_spread = Some(Duration::from_millis(1));
        let a = || vec![job("a", Protocol::Imap, Duration::from_secs(60))];
        s.apply(a(), &sch);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rec.now_running.load(Ordering::SeqCst), 1);
        s.apply(Vec::new(), &sch);
        assert_eq!(s.len(), 0);
        s.apply(a(), &sch);
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert_eq!(
            rec.max_per_key.load(Ordering::SeqCst),
            1,
            "two connections at once"
        );
        let runs = rec.runs_of("a");
        assert_eq!(runs.len(), 2, "{runs:?}");
        // The re-added job's first run started when the old one ended, not before.
        assert!(runs[1] >= runs[0] + Duration::from_secs(20), "{runs:?}");

        // Removed while waiting for a permit: it never starts.
        let rec = Recorder::new(Duration::from_secs(30));
        let mut s = Scheduler::new(Arc::new(rec.clone()) as Arc<dyn Execute<()>>, 1);
        let sch = {
            let mut sch = schedule(1, Duration::ZERO);
            sch.startup_spread = Some(Duration::from_millis(1));
            sch
        };
        s.apply(
            vec![
                job("first", Protocol::Imap, Duration::from_secs(600)),
                job("second", Protocol::Imap, Duration::from_secs(600)),
            ],
            &sch,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rec.now_running.load(Ordering::SeqCst), 1);
        let running = rec.runs.lock().unwrap()[0].0.clone();
        let waiting = if running == "first" {
            "second"
        } else {
            "first"
        };
        s.apply(
            vec![job(&running, Protocol::Imap, Duration::from_secs(600))],
            &sch,
        );
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(rec.runs_of(waiting).is_empty(), "a removed job ran");
        assert_eq!(rec.runs_of(&running).len(), 1);
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
