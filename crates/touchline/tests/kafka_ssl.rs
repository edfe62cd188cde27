//! With the `kafka-ssl` feature, librdkafka is built with OpenSSL: Touchline's producer and
//! consumer, configured for TLS to Kafka through `kafka.properties` (`security.protocol` `SSL` or
//! `SASL_SSL`, a CA file), are created, where a default build refuses them ("OpenSSL not
//! available at build time"). Run with `cargo test -p touchline --features kafka-ssl --test
//! kafka_ssl` (needs OpenSSL's headers); `.ci/run` does not build the feature.
#![cfg(any(feature = "kafka-ssl", feature = "kafka-ssl-vendored"))]

use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::BaseProducer;
use touchline_kafka::KafkaOptions;

#[test]
fn clients_configured_for_tls_to_kafka_are_created() {
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tls/ca.pem");
    for protocol in ["SSL", "SASL_SSL"] {
        let mut options = KafkaOptions {
            bootstrap_servers: "127.0.0.1:9093".to_owned(),
            ..KafkaOptions::default()
        };
        options
            .properties
            .insert("security.protocol".to_owned(), protocol.to_owned());
        options
            .properties
            .insert("ssl.ca.location".to_owned(), ca.display().to_string());
        if protocol == "SASL_SSL" {
            for (key, value) in [
                ("sasl.mechanisms", "SCRAM-SHA-512"),
                ("sasl.username", "touchline"),
                ("sasl.password", "secret"),
            ] {
                options.properties.insert(key.to_owned(), value.to_owned());
            }
        }
        let producer: Result<BaseProducer, _> = options.producer_config().create();
        assert!(producer.is_ok(), "{protocol}: {:?}", producer.err());
        let consumer: Result<BaseConsumer, _> = options.consumer_config().create();
        assert!(consumer.is_ok(), "{protocol}: {:?}", consumer.err());
    }
}
