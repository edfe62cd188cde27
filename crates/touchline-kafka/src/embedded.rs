//! The embedded broker: librdkafka's mock cluster, in-process, speaking the real Kafka protocol on
//! a loopback port. Data lives in memory only and is gone when the process ends.
//!
//! The mock cluster handle is not `Send`, so it lives on a thread of its own; [`EmbeddedBroker`]
//! is a cheap handle that sends it commands (fault injection for tests) and stops it on drop.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::{Error, Result};

enum Command {
    BrokerDown(mpsc::Sender<Result<()>>),
    BrokerUp(mpsc::Sender<Result<()>>),
    RoundTripTime(Duration, mpsc::Sender<Result<()>>),
    CreateTopic(String, i32, mpsc::Sender<Result<()>>),
    RequestErrors(RDKafkaApiKey, Vec<RDKafkaRespErr>, mpsc::Sender<Result<()>>),
    ClearRequestErrors(RDKafkaApiKey, mpsc::Sender<Result<()>>),
}

/// A running in-process mock Kafka cluster. Dropping it stops the cluster.
#[derive(Debug)]
pub struct EmbeddedBroker {
    bootstrap_servers: String,
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts a mock cluster of `brokers` brokers and creates `topic` with `partitions`.
    ///
    /// # Errors
    /// When librdkafka cannot create the cluster or the topic.
    pub fn start(brokers: i32, topic: &str, partitions: i32) -> Result<Self> {
        let (ready_sender, ready) = mpsc::channel::<Result<String>>();
        let (commands, command_receiver) = mpsc::channel::<Command>();
        let topic = topic.to_owned();
        let thread = std::thread::Builder::new()
            .name("embedded-kafka".to_owned())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(cluster) => cluster,
                    Err(error) => {
                        let _ = ready_sender.send(Err(Error::EmbeddedStart(error.to_string())));
                        return;
                    }
                };
                if let Err(error) = cluster.create_topic(&topic, partitions, 1) {
                    let _ = ready_sender.send(Err(Error::EmbeddedStart(error.to_string())));
                    return;
                }
                let _ = ready_sender.send(Ok(cluster.bootstrap_servers()));
                // Serve commands until every handle is gone.
                while let Ok(command) = command_receiver.recv() {
                    let (result, reply) = match command {
                        Command::BrokerDown(reply) => (cluster.broker_down(-1), reply),
                        Command::BrokerUp(reply) => (cluster.broker_up(-1), reply),
                        Command::RoundTripTime(delay, reply) => {
                            (cluster.broker_round_trip_time(-1, delay), reply)
                        }
                        Command::CreateTopic(name, partitions, reply) => {
                            (cluster.create_topic(&name, partitions, 1), reply)
                        }
                        Command::RequestErrors(api, errors, reply) => {
                            cluster.request_errors(api, &errors);
                            (Ok(()), reply)
                        }
                        Command::ClearRequestErrors(api, reply) => {
                            cluster.clear_request_errors(api);
                            (Ok(()), reply)
                        }
                    };
                    let _ = reply.send(result.map_err(Error::from));
                }
            })
            .map_err(|error| Error::EmbeddedStart(error.to_string()))?;
        let bootstrap_servers = ready.recv().map_err(|_| {
            Error::EmbeddedStart("the broker thread ended before it was ready".to_owned())
        })??;
        tracing::info!(%bootstrap_servers, brokers, partitions, "embedded kafka broker started");
        Ok(Self {
            bootstrap_servers,
            commands: Some(commands),
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` of the cluster.
    #[must_use]
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    fn call(&self, command: impl FnOnce(mpsc::Sender<Result<()>>) -> Command) -> Result<()> {
        let (reply, answer) = mpsc::channel();
        let stopped = || Error::EmbeddedStart("the embedded broker is stopped".to_owned());
        self.commands
            .as_ref()
            .ok_or_else(stopped)?
            .send(command(reply))
            .map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }

    /// Takes every broker down: connections are closed and refused until [`Self::broker_up`].
    ///
    /// # Errors
    /// When the cluster is stopped or refuses.
    pub fn broker_down(&self) -> Result<()> {
        self.call(Command::BrokerDown)
    }

    /// Brings every broker back.
    ///
    /// # Errors
    /// When the cluster is stopped or refuses.
    pub fn broker_up(&self) -> Result<()> {
        self.call(Command::BrokerUp)
    }

    /// Delays every broker's responses by `delay`.
    ///
    /// # Errors
    /// When the cluster is stopped or refuses.
    pub fn set_round_trip_time(&self, delay: Duration) -> Result<()> {
        self.call(|reply| Command::RoundTripTime(delay, reply))
    }

    /// Makes the next Produce requests fail, one per error, in order.
    ///
    /// # Errors
    /// When the cluster is stopped.
    pub fn fail_next_produces(&self, errors: &[RDKafkaRespErr]) -> Result<()> {
        let errors = errors.to_vec();
        self.call(|reply| Command::RequestErrors(RDKafkaApiKey::Produce, errors, reply))
    }

    /// Makes the next Fetch requests fail, one per error, in order.
    ///
    /// # Errors
    /// When the cluster is stopped.
    pub fn fail_next_fetches(&self, errors: &[RDKafkaRespErr]) -> Result<()> {
        let errors = errors.to_vec();
        self.call(|reply| Command::RequestErrors(RDKafkaApiKey::Fetch, errors, reply))
    }

    /// Drops the Fetch errors [`Self::fail_next_fetches`] queued that are still to come.
    ///
    /// # Errors
    /// When the cluster is stopped.
    pub fn clear_fetch_errors(&self) -> Result<()> {
        self.call(|reply| Command::ClearRequestErrors(RDKafkaApiKey::Fetch, reply))
    }

    /// Creates another topic.
    ///
    /// # Errors
    /// When the cluster is stopped or refuses.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        self.call(|reply| Command::CreateTopic(topic.to_owned(), partitions, reply))
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
