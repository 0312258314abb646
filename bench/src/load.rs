//! The load generator of the end-to-end benchmark: one MQTT client (TCP_NODELAY on)
//! that calls one method of a device with a fixed payload, keeping N calls in flight
//! (a closed loop: each answer sends the next call), and matches answers to calls by
//! request id. It speaks the wire protocol itself, on one task that both sends and
//! receives, rather than through edge-invoker's `Caller` (which syncs presence per
//! device), so that the floor and the host get the same plain load.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use edge_proto::{BrokerUrl, Namespace};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};

/// How long a call may go unanswered before it counts as missing.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests the client may queue: far more than the calls kept in flight.
const QUEUE: usize = 4096;

/// The calls a benchmark makes: how many one at a time, how many in flight for how
/// long, and how large.
#[derive(Debug, clap::Args)]
pub struct Load {
    /// Calls timed one at a time (after the warm-up).
    #[arg(long, default_value_t = 2_000)]
    pub calls: usize,
    /// Calls made one at a time before the timed ones.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// Calls kept in flight for the throughput figure.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Seconds the throughput window lasts (after a second of warm-up).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Payload size in bytes (a JSON string).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
}

impl Load {
    /// The payload every call sends: a JSON string [`Load::payload`] bytes long.
    pub fn payload_bytes(&self) -> Vec<u8> {
        format!("\"{}\"", "x".repeat(self.payload.saturating_sub(2))).into_bytes()
    }
}

/// The generators' MQTT keep-alive. A generator's event loop runs only while it makes
/// calls, and one stays connected through a whole run while other subjects are
/// measured (with `e2e --lang`, minutes): with a keep-alive of seconds the broker would
/// drop it for not pinging in the meantime.
const KEEP_ALIVE: Duration = Duration::from_secs(3600);

/// One MQTT client calling one method of one device.
pub struct Generator {
    client: AsyncClient,
    eventloop: EventLoop,
    namespace: Namespace,
    /// The method every call names.
    method: String,
    /// The payload every call sends, and every answer must echo.
    payload: Vec<u8>,
    /// The request id of the next call is `b{next_id}`.
    next_id: u64,
    /// Calls sent and not answered yet, by request id, with when they were sent.
    pending: HashMap<String, Instant>,
}

/// The answer to one call.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// The status in the response topic.
    pub status: u16,
    /// From publishing the request to receiving the answer.
    pub latency: Duration,
    /// Whether the answer's payload is the request's.
    echoed: bool,
}

/// Calls that did not get the answer they should have: status 200 with the payload
/// sent.
#[derive(Debug, Default)]
pub struct Errors {
    /// Answers with another status, by status.
    by_status: BTreeMap<u16, u64>,
    /// Answers with status 200 but another payload.
    wrong_payload: u64,
    /// Calls with no answer within [`ANSWER_TIMEOUT`].
    missing: u64,
}

impl Errors {
    /// Counts `answer` if it is wrong; whether it was right.
    fn check(&mut self, answer: &Answer) -> bool {
        self.check_reply(answer.status, answer.echoed)
    }

    /// Counts an answer with `status` whose payload was (`echoed`) or was not the
    /// request's, if it is wrong; whether it was right.
    pub fn check_reply(&mut self, status: u16, echoed: bool) -> bool {
        if status != 200 {
            *self.by_status.entry(status).or_default() += 1;
            false
        } else if !echoed {
            self.wrong_payload += 1;
            false
        } else {
            true
        }
    }

    /// Counts `calls` that got no answer.
    pub fn add_missing(&mut self, calls: u64) {
        self.missing += calls;
    }

    /// All the failed calls.
    pub fn total(&self) -> u64 {
        self.by_status.values().sum::<u64>() + self.wrong_payload + self.missing
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Errors) {
        for (status, count) in &other.by_status {
            *self.by_status.entry(*status).or_default() += count;
        }
        self.wrong_payload += other.wrong_payload;
        self.missing += other.missing;
    }
}

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.total())?;
        let mut kinds: Vec<String> = self
            .by_status
            .iter()
            .map(|(status, count)| format!("status {status}: {count}"))
            .collect();
        if self.wrong_payload > 0 {
            kinds.push(format!("wrong payload: {}", self.wrong_payload));
        }
        if self.missing > 0 {
            kinds.push(format!("no answer: {}", self.missing));
        }
        if !kinds.is_empty() {
            write!(f, " ({})", kinds.join(", "))?;
        }
        Ok(())
    }
}

/// What one call at a time measured.
pub struct LatencyRun {
    /// The latency of every call answered right, warm-up left out, in call order.
    pub latencies: Vec<Duration>,
    /// Failed calls, warm-up included.
    pub errors: Errors,
}

/// What N calls in flight measured.
pub struct ThroughputRun {
    /// Calls answered within the measured window (wrong answers included).
    pub calls: u64,
    /// The measured window.
    pub elapsed: Duration,
    /// The CPU time the process under test used within the window.
    pub cpu: Duration,
    /// Failed calls, warm-up and drain included.
    pub errors: Errors,
}

impl ThroughputRun {
    /// Calls answered per second.
    pub fn per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU time of the process under test per call answered.
    pub fn cpu_per_call(&self) -> Duration {
        self.cpu
            .checked_div(u32::try_from(self.calls).unwrap_or(u32::MAX))
            .unwrap_or_default()
    }
}

impl Generator {
    /// Connects to `broker` and subscribes to `device_id`'s answers (QoS 1, as callers
    /// do), ready to call `method` with `payload`.
    ///
    /// # Errors
    /// When the broker cannot be reached or does not acknowledge the subscription
    /// within 10 s.
    pub async fn connect(
        broker: &BrokerUrl,
        device_id: &str,
        method: &str,
        payload: Vec<u8>,
    ) -> anyhow::Result<Self> {
        let namespace = Namespace::for_device(device_id)?;
        // A run may keep several generators connected at once: each has an id of its own.
        static GENERATORS: AtomicU64 = AtomicU64::new(0);
        let serial = GENERATORS.fetch_add(1, Ordering::Relaxed);
        let options = edge_proto::client::options(
            &format!("edge-bench-load-{}-{serial}", std::process::id()),
            broker,
            &edge_proto::transport::Security::default(),
            KEEP_ALIVE,
        )?;
        let (client, mut eventloop) =
            edge_proto::client::start(options, QUEUE, edge_proto::client::CONNECT_TIMEOUT);
        client.try_subscribe(namespace.response_filter(), QoS::AtLeastOnce)?;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await? {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .with_context(|| format!("no SUBACK from {broker} within 10 s"))??;
        Ok(Self {
            client,
            eventloop,
            namespace,
            method: method.to_owned(),
            payload,
            next_id: 0,
            pending: HashMap::new(),
        })
    }

    /// Calls `method` from now on.
    pub fn set_method(&mut self, method: &str) {
        method.clone_into(&mut self.method);
    }

    /// Sends one call (QoS 0, as callers send requests).
    fn send(&mut self) -> anyhow::Result<()> {
        self.next_id += 1;
        let request_id = format!("b{}", self.next_id);
        let topic = self.namespace.request_topic(&self.method, &request_id);
        self.client
            .try_publish(topic, QoS::AtMostOnce, false, self.payload.clone())
            .context("queueing a request")?;
        self.pending.insert(request_id, Instant::now());
        Ok(())
    }

    /// The answer to the next pending call answered within `timeout`, or `None`.
    /// Answers to calls no longer pending (already given up on) are skipped.
    async fn next_answer(&mut self, timeout: Duration) -> anyhow::Result<Option<Answer>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(event) = tokio::time::timeout_at(deadline, self.eventloop.poll()).await else {
                return Ok(None);
            };
            let Event::Incoming(Packet::Publish(publish)) =
                event.context("the load generator lost the broker")?
            else {
                continue;
            };
            let Some(response) = self.namespace.parse_response(&publish.topic) else {
                continue;
            };
            let Some(sent) = self.pending.remove(response.request_id) else {
                continue;
            };
            return Ok(Some(Answer {
                status: response.status,
                latency: sent.elapsed(),
                echoed: publish.payload == self.payload,
            }));
        }
    }

    /// Makes one call and waits up to `timeout` for its answer (given up on after).
    ///
    /// # Errors
    /// When the connection to the broker is lost.
    pub async fn call_once(&mut self, timeout: Duration) -> anyhow::Result<Option<Answer>> {
        self.send()?;
        let answer = self.next_answer(timeout).await?;
        self.pending.clear();
        Ok(answer)
    }

    /// Makes `warmup` and then `calls` calls one after the other, timing the latter.
    ///
    /// # Errors
    /// When the connection to the broker is lost.
    pub async fn latency(&mut self, warmup: usize, calls: usize) -> anyhow::Result<LatencyRun> {
        let mut latencies = Vec::with_capacity(calls);
        let mut errors = Errors::default();
        for call in 0..warmup + calls {
            self.send()?;
            match self.next_answer(ANSWER_TIMEOUT).await? {
                Some(answer) => {
                    if errors.check(&answer) && call >= warmup {
                        latencies.push(answer.latency);
                    }
                }
                None => {
                    errors.missing += 1;
                    self.pending.clear();
                }
            }
        }
        Ok(LatencyRun { latencies, errors })
    }

    /// Keeps `in_flight` calls in flight for `warmup` and then for `window`, counting
    /// the calls answered in the window and the CPU time `cpu_time` says the process
    /// under test used in it; then waits for the calls still in flight.
    ///
    /// # Errors
    /// When the connection to the broker is lost or `cpu_time` fails.
    pub async fn throughput(
        &mut self,
        in_flight: usize,
        warmup: Duration,
        window: Duration,
        cpu_time: impl Fn() -> anyhow::Result<Duration>,
    ) -> anyhow::Result<ThroughputRun> {
        let mut errors = Errors::default();
        let mut answered: u64 = 0;
        // When the window opened: the time, the calls answered and the CPU time by then.
        let mut opened: Option<(Instant, u64, Duration)> = None;
        let window_opens = Instant::now() + warmup;
        for _ in 0..in_flight {
            self.send()?;
        }
        loop {
            let now = Instant::now();
            match opened {
                None if now >= window_opens => opened = Some((now, answered, cpu_time()?)),
                Some((start, _, _)) if now >= start + window => break,
                _ => {}
            }
            match self.next_answer(ANSWER_TIMEOUT).await? {
                Some(answer) => {
                    answered += 1;
                    errors.check(&answer);
                    self.send()?;
                }
                None => {
                    // Nothing answered for seconds: count what is pending as lost and
                    // start the calls in flight again.
                    errors.missing += self.pending.len() as u64;
                    self.pending.clear();
                    for _ in 0..in_flight {
                        self.send()?;
                    }
                }
            }
        }
        let closed = (Instant::now(), answered, cpu_time()?);
        let (start, answered_before, cpu_before) = opened.unwrap_or(closed);
        while !self.pending.is_empty() {
            match self.next_answer(ANSWER_TIMEOUT).await? {
                Some(answer) => {
                    errors.check(&answer);
                }
                None => {
                    errors.missing += self.pending.len() as u64;
                    self.pending.clear();
                }
            }
        }
        Ok(ThroughputRun {
            calls: closed.1 - answered_before,
            elapsed: closed.0 - start,
            cpu: closed.2.saturating_sub(cpu_before),
            errors,
        })
    }
}
