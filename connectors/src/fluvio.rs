//! The Fluvio source: a topic of a Fluvio cluster read through the official `fluvio` client,
//! behind the same [`Source`] trait as the local log.
//!
//! In: the address of the cluster's SC, a topic, and the name of a Fluvio consumer. Out: the
//! topic's records as [`SourceRecord`]s, read by (partition, offset) from the offsets the caller
//! gives, which in the pipeline come from hookflow's own settled-offset checkpoint. Fluvio's
//! consumer offsets only record the last record a stream yielded, which is not what hookflow
//! has settled, so they are never read back; [`Source::settled`] moves the named consumer's
//! offset to the settled one so that Fluvio's own tools show the lag.
//!
//! The client is asynchronous and runs on Fluvio's own executor; this adapter blocks on it.
//! State: the client connection (absent while the cluster is unreachable), one open record
//! stream per partition being read, positioned at the next offset the caller is expected to
//! ask for, the reconnection backoff and the shared [`SourceStatus`].
//!
//! A lost connection fails a read with a transient [`ConnectorError::Fluvio`]
//! ([`ConnectorError::is_transient`]), turns the status down, and the first read past the
//! backoff delay connects again from the offset the caller asks for, so nothing is skipped.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fluvio::consumer::{
    ConsumerConfigExtBuilder, ConsumerStream, OffsetManagementStrategy, Record, RetryMode,
};
use fluvio::metadata::customspu::CustomSpuSpec;
use fluvio::metadata::topic::TopicSpec;
use fluvio::{Fluvio, FluvioClusterConfig, Offset, TopicProducerPool};
use fluvio_future::future::{poll_once, timeout};
use fluvio_future::task::run_block_on;
use futures_util::StreamExt;
use hookflow_schemas::SourceRecord;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::source::SourceStatus;
use crate::{ConnectorError, Source};

/// The minimum wait before connecting again after a failure.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
/// The maximum wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The minimum interval between two writes of the named consumer's offset for one partition.
const CONSUMER_COMMIT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stream may yield nothing before the partition's end is read to check that no
/// records wait behind it.
const STALL_CHECK: Duration = Duration::from_secs(1);
/// Offsets further apart than this are fetched by separate streams when payloads are read
/// back, instead of one stream reading every record between them.
const FETCH_GAP: u64 = 256;

/// The cluster address, topic and consumer of a Fluvio source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluvioOptions {
    /// The SC's public address, `host:port`.
    pub endpoint: String,
    /// The topic holding the events.
    pub topic: String,
    /// The Fluvio consumer whose offsets follow hookflow's checkpoint; empty for none.
    pub consumer: String,
    /// How long one connection attempt or one request may take, in ms.
    pub timeout_ms: u64,
}

impl FluvioOptions {
    /// Options for `topic` at `endpoint`, with consumer `hookflow` and a 10 s timeout.
    pub fn new(endpoint: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            topic: topic.into(),
            consumer: "hookflow".to_string(),
            timeout_ms: 10_000,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }
}

type RecordStream = Pin<Box<dyn ConsumerStream + Send>>;

/// The stream of one partition, the offset of the next record it will yield, and the end of
/// the partition when the stream was opened: records below it exist, so a read waits for them
/// instead of finding the new stream empty.
struct PartitionReader {
    next: u64,
    end_at_open: u64,
    stream: RecordStream,
    /// When the stream last yielded a record, or the partition's end was last checked.
    checked_at: Instant,
}

/// A topic of a Fluvio cluster, read by (partition, offset).
///
/// Open one per thread that reads, like [`LocalLog`](crate::LocalLog). Several may share one
/// [`SourceStatus`].
pub struct FluvioSource {
    options: FluvioOptions,
    client: Option<Fluvio>,
    partitions: u32,
    readers: HashMap<u32, PartitionReader>,
    producer: Option<TopicProducerPool>,
    status: Arc<SourceStatus>,
    /// No connection attempt before this instant.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The offset last written for the named consumer, and when, per partition.
    committed: HashMap<u32, (u64, Instant)>,
}

impl std::fmt::Debug for FluvioSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FluvioSource")
            .field("options", &self.options)
            .field("connected", &self.client.is_some())
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl FluvioSource {
    /// Connects to the SC at `options.endpoint`, looks up the topic's partition count, and
    /// reads the end of every partition from its SPU, so that an unreachable SPU is found now
    /// rather than at the first read.
    ///
    /// # Errors
    ///
    /// Fails with [`ConnectorError::Fluvio`], naming the address and the step that failed,
    /// if the SC cannot be reached in time, the topic does not exist, or an SPU cannot be read.
    pub fn connect(
        options: FluvioOptions,
        status: Arc<SourceStatus>,
    ) -> Result<Self, ConnectorError> {
        let mut source = Self {
            options,
            client: None,
            partitions: 0,
            readers: HashMap::new(),
            producer: None,
            status,
            retry_at: None,
            backoff: MIN_BACKOFF,
            committed: HashMap::new(),
        };
        let client = source.connect_client()?;
        source.partitions = source.topic_partitions(&client)?;
        source.client = Some(client);
        for partition in 0..source.partitions {
            if let Err(error) = source.fetch_end(partition) {
                let spus = source.spu_addresses();
                return Err(ConnectorError::Fluvio {
                    action: "read the partitions of the topic from their SPU",
                    endpoint: source.options.endpoint.clone(),
                    detail: format!(
                        "partition {partition} of topic {:?}: {error}; SPUs registered with the SC: {spus}",
                        source.options.topic
                    ),
                });
            }
        }
        source.status.mark_up();
        info!(
            endpoint = %source.options.endpoint,
            topic = %source.options.topic,
            partitions = source.partitions,
            "Connected to Fluvio."
        );
        Ok(source)
    }

    /// Returns the options this source was opened with.
    pub fn options(&self) -> &FluvioOptions {
        &self.options
    }

    /// Returns the status this source reports to.
    pub fn status(&self) -> &Arc<SourceStatus> {
        &self.status
    }

    /// Produces `records` (key, value) to the topic and waits until the SPU has acknowledged
    /// every one. Returns the (partition, offset) of each, in input order. Keys choose the
    /// partition, so records with the same key stay in order in one partition.
    ///
    /// # Errors
    ///
    /// Fails if the producer cannot be made or a record is not acknowledged in time; records
    /// acknowledged before the failure stay in the topic.
    pub fn produce(
        &mut self,
        records: &[(&[u8], &[u8])],
    ) -> Result<Vec<(u32, u64)>, ConnectorError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let limit = self.options.timeout();
        let endpoint = self.options.endpoint.clone();
        let error = |action: &'static str, detail: String| ConnectorError::Fluvio {
            action,
            endpoint: endpoint.clone(),
            detail,
        };
        if self.producer.is_none() {
            let topic = self.options.topic.clone();
            let client = self.client()?;
            let producer = block_on_timeout(limit, client.topic_producer(topic))
                .map_err(|detail| error("create a producer", detail))?
                .map_err(|e| error("create a producer", format!("{e:#}")))?;
            self.producer = Some(producer);
        }
        let Some(producer) = self.producer.as_ref() else {
            return Err(error("create a producer", "no producer".to_string()));
        };
        let result = block_on_timeout(limit, async {
            let mut outputs = Vec::with_capacity(records.len());
            for (key, value) in records {
                outputs.push(
                    producer
                        .send(key.to_vec(), value.to_vec())
                        .await
                        .map_err(describe)?,
                );
            }
            producer.flush().await.map_err(describe)?;
            let mut positions = Vec::with_capacity(outputs.len());
            for output in outputs {
                let metadata = output.wait().await.map_err(describe)?;
                positions.push((metadata.partition_id(), offset_u64(metadata.offset())));
            }
            Ok::<_, String>(positions)
        })
        .and_then(|produced| produced);
        result.map_err(|detail| {
            // A failed producer may hold records it could not send; the next call makes a new one.
            self.producer = None;
            error("produce records", detail)
        })
    }

    fn client(&mut self) -> Result<&Fluvio, ConnectorError> {
        if self.client.is_none() {
            let client = self.connect_client()?;
            self.client = Some(client);
        }
        self.client.as_ref().ok_or_else(|| ConnectorError::Fluvio {
            action: "connect to the SC",
            endpoint: self.options.endpoint.clone(),
            detail: "not connected".to_string(),
        })
    }

    fn connect_client(&self) -> Result<Fluvio, ConnectorError> {
        let config = FluvioClusterConfig::new(self.options.endpoint.clone());
        block_on_timeout(self.options.timeout(), Fluvio::connect_with_config(&config))
            .and_then(|result| result.map_err(|e| format!("{e:#}")))
            .map_err(|detail| ConnectorError::Fluvio {
                action: "connect to the SC",
                endpoint: self.options.endpoint.clone(),
                detail,
            })
    }

    fn topic_partitions(&self, client: &Fluvio) -> Result<u32, ConnectorError> {
        let topic = self.options.topic.clone();
        let error = |detail: String| ConnectorError::Fluvio {
            action: "look up the topic",
            endpoint: self.options.endpoint.clone(),
            detail,
        };
        let topics = block_on_timeout(self.options.timeout(), async {
            let admin = client.admin().await;
            admin.list::<TopicSpec, String>(vec![topic.clone()]).await
        })
        .map_err(error)?
        .map_err(|e| error(format!("{e:#}")))?;
        let spec = topics
            .into_iter()
            .find(|meta| meta.name == self.options.topic)
            .ok_or_else(|| {
                error(format!(
                    "the SC has no topic {:?}; create it first",
                    self.options.topic
                ))
            })?
            .spec;
        let partitions = spec.partitions();
        if partitions == 0 {
            return Err(error(format!(
                "topic {:?} has no partitions",
                self.options.topic
            )));
        }
        Ok(partitions)
    }

    /// Lists the public addresses of the SPUs registered with the SC, for error messages.
    fn spu_addresses(&self) -> String {
        let Some(client) = self.client.as_ref() else {
            return "unknown (not connected)".to_string();
        };
        let listed = block_on_timeout(self.options.timeout(), async {
            let admin = client.admin().await;
            admin.all::<CustomSpuSpec>().await
        });
        match listed {
            Ok(Ok(spus)) if spus.is_empty() => "none".to_string(),
            Ok(Ok(spus)) => spus
                .iter()
                .map(|spu| {
                    format!(
                        "{} (id {}) at {}",
                        spu.name, spu.spec.id, spu.spec.public_endpoint
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            Ok(Err(e)) => format!("unknown ({e:#})"),
            Err(detail) => format!("unknown ({detail})"),
        }
    }

    /// Opens a stream of `partition` from `offset`. `continuous` keeps it open for records
    /// appended later; otherwise it ends at the current end of the partition.
    fn open_stream(
        &mut self,
        partition: u32,
        offset: Offset,
        continuous: bool,
        consumer: Option<String>,
    ) -> Result<RecordStream, String> {
        let limit = self.options.timeout();
        let topic = self.options.topic.clone();
        let client = self.client().map_err(|e| e.to_string())?;
        let mut builder = ConsumerConfigExtBuilder::default();
        builder
            .topic(topic)
            .partition(partition)
            .offset_start(offset)
            .disable_continuous(!continuous)
            // Reconnection is this adapter's, so that the status and the log show it.
            .retry_mode(RetryMode::Disabled);
        if let Some(consumer) = consumer {
            builder
                .offset_consumer(consumer)
                .offset_strategy(OffsetManagementStrategy::Manual);
        }
        let config = builder.build().map_err(|e| format!("{e:#}"))?;
        let stream = block_on_timeout(limit, client.consumer_with_config(config))?
            .map_err(|e| format!("{e:#}"))?;
        Ok(Box::pin(stream))
    }

    /// Reads the end of `partition` from its SPU: one past the offset of its last record.
    fn fetch_end(&mut self, partition: u32) -> Result<u64, String> {
        let limit = self.options.timeout();
        let mut stream = self.open_stream(partition, Offset::from_end(1), false, None)?;
        // NOTE: a partition whose records were all removed by Fluvio's retention reads as 0
        // here. Nothing below its start can be read again, so the pipeline's resume bound
        // loses nothing by it.
        match block_on_timeout(limit, stream.next())? {
            Some(Ok(record)) => Ok(offset_u64(record.offset()) + 1),
            Some(Err(code)) => Err(format!("the SPU answered {code}")),
            None => Ok(0),
        }
    }

    /// Reads what has arrived for `partition` from `from_offset` on, without waiting.
    fn try_read(
        &mut self,
        partition: u32,
        from_offset: u64,
        max_records: usize,
    ) -> Result<Vec<SourceRecord>, String> {
        if self
            .readers
            .get(&partition)
            .is_none_or(|reader| reader.next != from_offset)
        {
            self.readers.remove(&partition);
            let end_at_open = self.fetch_end(partition)?;
            let offset = Offset::absolute(i64::try_from(from_offset).unwrap_or(i64::MAX))
                .map_err(|e| e.to_string())?;
            let stream = self.open_stream(partition, offset, true, None)?;
            self.readers.insert(
                partition,
                PartitionReader {
                    next: from_offset,
                    end_at_open,
                    stream,
                    checked_at: Instant::now(),
                },
            );
        }
        let limit = self.options.timeout();
        let Some(reader) = self.readers.get_mut(&partition) else {
            return Ok(Vec::new());
        };
        let mut records = Vec::new();
        let wait_first = reader.next < reader.end_at_open;
        let mut expected = reader.next;
        let outcome: Result<Taken, String> = run_block_on(async {
            if wait_first {
                let item = timeout(limit, reader.stream.next())
                    .await
                    .map_err(|_| format!("no record within {} ms", limit.as_millis()))?;
                if take(item, partition, &mut expected, &mut records)? == Taken::Gap {
                    return Ok(Taken::Gap);
                }
            }
            while records.len() < max_records {
                match poll_once(reader.stream.next()).await {
                    None => break,
                    Some(item) => {
                        if take(item, partition, &mut expected, &mut records)? == Taken::Gap {
                            return Ok(Taken::Gap);
                        }
                    }
                }
            }
            Ok(Taken::Record)
        });
        if let Some(last) = records.last() {
            reader.next = last.offset + 1;
            reader.checked_at = Instant::now();
        }
        if outcome == Ok(Taken::Gap) {
            // The stream skipped offsets (seen with fluvio 0.50.1 after a response cut short
            // by its byte limit). Offsets are dense, so a new stream reads the skipped ones.
            debug!(
                partition,
                next = reader.next,
                "The record stream skipped offsets; opening a new one."
            );
            self.readers.remove(&partition);
            return Ok(records);
        }
        let stalled =
            outcome.is_ok() && records.is_empty() && reader.checked_at.elapsed() >= STALL_CHECK;
        if stalled {
            reader.checked_at = Instant::now();
            let next = reader.next;
            // The client sends the SPU its read position with a `try_send` that drops the
            // update when its channel is full, and the SPU then stops sending records. Such a
            // stream is replaced by a new one from the same offset.
            let end = self.fetch_end(partition)?;
            if end > next {
                debug!(
                    partition,
                    next,
                    end,
                    "The record stream stopped short of the partition's end; opening a new one."
                );
                self.readers.remove(&partition);
            }
            return Ok(records);
        }
        match outcome {
            Ok(_) => Ok(records),
            // Records that arrived before the failure are still good; the next read requests
            // the offset after them and opens a new stream.
            Err(_) if !records.is_empty() => {
                self.readers.remove(&partition);
                Ok(records)
            }
            Err(detail) => Err(detail),
        }
    }

    /// Notes a failed request: drops the streams (and the client if the SC was unreachable),
    /// turns the status down and schedules the next attempt.
    fn connection_lost(&mut self, detail: &str) {
        let was_up = self.status.is_up();
        self.status
            .mark_down(format!("Fluvio at {}: {detail}", self.options.endpoint));
        self.readers.clear();
        self.producer = None;
        self.client = None;
        if was_up {
            warn!(endpoint = %self.options.endpoint, topic = %self.options.topic, error = %detail, "Lost the connection to Fluvio; reconnecting with backoff.");
        } else {
            warn!(endpoint = %self.options.endpoint, error = %detail, retry_in_ms = self.backoff.as_millis() as u64, "Fluvio is still unreachable.");
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn connection_ok(&mut self) {
        if !self.status.is_up() {
            info!(endpoint = %self.options.endpoint, topic = %self.options.topic, "Reconnected to Fluvio; reading on from the checkpoint.");
        }
        self.status.mark_up();
        self.retry_at = None;
        self.backoff = MIN_BACKOFF;
    }

    fn waiting_to_retry(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }

    fn check_partition(&self, partition: u32) -> Result<(), ConnectorError> {
        if partition < self.partitions {
            Ok(())
        } else {
            Err(ConnectorError::PartitionOutOfRange {
                partition,
                partitions: self.partitions,
            })
        }
    }

    fn unavailable(&self, detail: String) -> ConnectorError {
        ConnectorError::Fluvio {
            action: "read the topic",
            endpoint: self.options.endpoint.clone(),
            detail,
        }
    }

    /// Reads the records of `partition` at `offsets` (sorted, distinct): one stream per run of
    /// offsets closer than [`FETCH_GAP`] to each other.
    fn fetch_partition(
        &mut self,
        partition: u32,
        offsets: &[u64],
    ) -> Result<HashMap<u64, SourceRecord>, String> {
        let limit = self.options.timeout();
        let mut found = HashMap::new();
        let mut start = 0;
        while start < offsets.len() {
            let mut end = start;
            while end + 1 < offsets.len() && offsets[end + 1] - offsets[end] <= FETCH_GAP {
                end += 1;
            }
            let (first, last) = (offsets[start], offsets[end]);
            let wanted = &offsets[start..=end];
            let offset = Offset::absolute(i64::try_from(first).unwrap_or(i64::MAX))
                .map_err(|e| e.to_string())?;
            let mut stream = self.open_stream(partition, offset, false, None)?;
            let records: Result<Vec<SourceRecord>, String> = block_on_timeout(limit, async {
                let mut records = Vec::new();
                while let Some(item) = stream.next().await {
                    let record = item.map_err(|code| format!("the SPU answered {code}"))?;
                    let record = to_source_record(partition, &record);
                    let past = record.offset >= last;
                    if wanted.binary_search(&record.offset).is_ok() {
                        records.push(record);
                    }
                    if past {
                        break;
                    }
                }
                Ok(records)
            })?;
            for record in records? {
                found.insert(record.offset, record);
            }
            // A stream can skip records (see `Taken::Gap`), so each one still missing gets a
            // stream of its own.
            let missing: Vec<u64> = wanted
                .iter()
                .copied()
                .filter(|offset| !found.contains_key(offset))
                .collect();
            for offset in missing {
                let start_at = Offset::absolute(i64::try_from(offset).unwrap_or(i64::MAX))
                    .map_err(|e| e.to_string())?;
                let mut stream = self.open_stream(partition, start_at, false, None)?;
                if let Some(Ok(record)) = block_on_timeout(limit, stream.next())? {
                    let record = to_source_record(partition, &record);
                    if record.offset == offset {
                        found.insert(offset, record);
                    }
                }
            }
            start = end + 1;
        }
        Ok(found)
    }
}

impl Source for FluvioSource {
    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn read(
        &mut self,
        partition: u32,
        from_offset: u64,
        max_records: usize,
    ) -> Result<Vec<SourceRecord>, ConnectorError> {
        self.check_partition(partition)?;
        if max_records == 0 {
            return Ok(Vec::new());
        }
        if self.waiting_to_retry() {
            return Err(self.unavailable("waiting to connect again".to_string()));
        }
        match self.try_read(partition, from_offset, max_records) {
            Ok(records) => {
                self.connection_ok();
                Ok(records)
            }
            Err(detail) => {
                self.connection_lost(&detail);
                Err(self.unavailable(detail))
            }
        }
    }

    fn end_offset(&mut self, partition: u32) -> Result<u64, ConnectorError> {
        self.check_partition(partition)?;
        // During a backoff a query would only fail again and double the backoff each time.
        if self.waiting_to_retry() {
            return Err(self.unavailable("waiting to connect again".to_string()));
        }
        match self.fetch_end(partition) {
            Ok(end) => {
                self.connection_ok();
                Ok(end)
            }
            Err(detail) => {
                self.connection_lost(&detail);
                Err(self.unavailable(detail))
            }
        }
    }

    fn fetch(&mut self, positions: &[(u32, u64)]) -> Vec<Result<SourceRecord, ConnectorError>> {
        let mut by_partition: HashMap<u32, Vec<u64>> = HashMap::new();
        for &(partition, offset) in positions {
            by_partition.entry(partition).or_default().push(offset);
        }
        let mut found: HashMap<u32, Result<HashMap<u64, SourceRecord>, String>> = HashMap::new();
        for (partition, mut offsets) in by_partition {
            if partition >= self.partitions {
                continue;
            }
            offsets.sort_unstable();
            offsets.dedup();
            let result = self.fetch_partition(partition, &offsets);
            match &result {
                Ok(_) => self.connection_ok(),
                Err(detail) => self.connection_lost(detail),
            }
            found.insert(partition, result);
        }
        positions
            .iter()
            .map(|&(partition, offset)| {
                self.check_partition(partition)?;
                match found.get(&partition) {
                    Some(Ok(records)) => records
                        .get(&offset)
                        .cloned()
                        .ok_or(ConnectorError::RecordMissing { partition, offset }),
                    Some(Err(detail)) => Err(self.unavailable(detail.clone())),
                    None => Err(ConnectorError::RecordMissing { partition, offset }),
                }
            })
            .collect()
    }

    fn settled(&mut self, offsets: &[(u32, u64)]) {
        if self.options.consumer.is_empty() || self.client.is_none() {
            return;
        }
        for &(partition, next) in offsets {
            if next == 0 || partition >= self.partitions {
                continue;
            }
            let due = self.committed.get(&partition).is_none_or(|(offset, at)| {
                *offset != next && at.elapsed() >= CONSUMER_COMMIT_INTERVAL
            });
            if !due {
                continue;
            }
            match self.commit_consumer(partition, next - 1) {
                Ok(()) => {
                    self.committed.insert(partition, (next, Instant::now()));
                }
                Err(detail) => {
                    // The consumer offset only informs Fluvio's tools; the checkpoint is ours.
                    warn!(consumer = %self.options.consumer, partition, error = %detail, "Could not move the Fluvio consumer offset.");
                    self.committed.insert(partition, (0, Instant::now()));
                }
            }
        }
    }
}

impl FluvioSource {
    /// Moves the named consumer's offset of `partition` to `last_settled`: Fluvio commits the
    /// last record a stream yielded, so this reads that one record with the consumer's name.
    fn commit_consumer(&mut self, partition: u32, last_settled: u64) -> Result<(), String> {
        let limit = self.options.timeout();
        let offset = Offset::absolute(i64::try_from(last_settled).unwrap_or(i64::MAX))
            .map_err(|e| e.to_string())?;
        let consumer = self.options.consumer.clone();
        let mut stream = self.open_stream(partition, offset, false, Some(consumer))?;
        block_on_timeout(limit, async {
            match stream.next().await {
                Some(Ok(record)) if offset_u64(record.offset()) == last_settled => {}
                Some(Ok(record)) => {
                    return Err(format!(
                        "expected offset {last_settled}, read {}",
                        record.offset()
                    ))
                }
                Some(Err(code)) => return Err(format!("the SPU answered {code}")),
                None => return Err(format!("no record at offset {last_settled}")),
            }
            stream
                .offset_commit()
                .await
                .map_err(|code| format!("commit: {code}"))?;
            stream
                .offset_flush()
                .await
                .map_err(|code| format!("flush: {code}"))?;
            Ok(())
        })?
    }
}

/// The result of [`take`] for a stream's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Added it, or dropped it as a repeat of one already read.
    Record,
    /// Found it past the offset expected next, and dropped it.
    Gap,
}

/// Adds a stream's record to `records` if it has the `expected` offset, or turns the item
/// into the error it is.
fn take(
    item: Option<Result<Record, fluvio::dataplane::link::ErrorCode>>,
    partition: u32,
    expected: &mut u64,
    records: &mut Vec<SourceRecord>,
) -> Result<Taken, String> {
    match item {
        Some(Ok(record)) => {
            let record = to_source_record(partition, &record);
            if record.offset > *expected {
                return Ok(Taken::Gap);
            }
            if record.offset == *expected {
                *expected += 1;
                records.push(record);
            }
            Ok(Taken::Record)
        }
        Some(Err(code)) => Err(format!("the SPU answered {code}")),
        None => Err("the SPU closed the stream".to_string()),
    }
}

/// Runs `future` on Fluvio's executor, giving up after `limit`.
fn block_on_timeout<T: Send + 'static>(
    limit: Duration,
    future: impl Future<Output = T>,
) -> Result<T, String> {
    run_block_on(timeout(limit, future))
        .map_err(|_| format!("no answer within {} ms", limit.as_millis()))
}

/// Formats a client error with its causes.
fn describe(error: impl std::fmt::Display) -> String {
    format!("{error:#}")
}

fn offset_u64(offset: i64) -> u64 {
    u64::try_from(offset).unwrap_or(0)
}

fn to_source_record(partition: u32, record: &Record) -> SourceRecord {
    let timestamp = record.timestamp();
    SourceRecord {
        partition,
        offset: offset_u64(record.offset()),
        appended_at_ms: u64::try_from(timestamp).ok().filter(|ms| *ms > 0),
        value: record.value().to_vec(),
    }
}
