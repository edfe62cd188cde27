use super::*;

#[test]
fn defaults_round_trip_through_toml() {
    let config = Config::default();
    let text = config.to_toml().expect("prints");
    let parsed: Config = toml::from_str(&text).expect("parses");
    assert_eq!(parsed, config);
}

#[test]
fn unknown_keys_are_refused() {
    assert!(toml::from_str::<Config>("[kafka]\nbootstrap = \"x\"\n").is_err());
    assert!(toml::from_str::<Config>("[nonsense]\n").is_err());
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail fixes the closure type"
)]
fn files_are_layered_over_defaults() {
    // In a jail: another test sets TOUCHLINE_* variables, which must not leak in here.
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "touchline.toml",
            "[kafka]\nbootstrap-servers = \"broker:9092\"\n[kafka.properties]\n\"security.protocol\" = \"ssl\"\n[projector]\nenabled = true\npartitions = [0, 1]\n[log]\nformat = \"json\"\n",
        )?;
        let config =
            Config::load(Some(Path::new("touchline.toml"))).map_err(|error| error.to_string())?;
        assert_eq!(config.kafka.bootstrap_servers, "broker:9092");
        assert_eq!(
            config
                .kafka
                .properties
                .get("security.protocol")
                .map(String::as_str),
            Some("ssl")
        );
        assert_eq!(config.projector.partitions, vec![0, 1]);
        assert_eq!(config.kafka.topic, KafkaOptions::default().topic);
        assert_eq!(config.log.format, LogFormat::Json);
        Ok(())
    });
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail fixes the closure type"
)]
fn environment_variables_override_the_file() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "touchline.toml",
            "[kafka]\nbootstrap-servers = \"from-file:9092\"\n",
        )?;
        jail.set_env("TOUCHLINE_KAFKA__BOOTSTRAP_SERVERS", "from-env:9092");
        jail.set_env("TOUCHLINE_INGEST__MAX_BATCH_EVENTS", "10");
        jail.set_env("TOUCHLINE_CONFIG", "touchline.toml");
        jail.set_env("TOUCHLINE_TOKEN", "a-partner-token");
        jail.set_env("TOUCHLINE_ADMIN_TOKEN", "an-admin-token");
        jail.set_env("TOUCHLINE_QUERY_TOKEN", "a-query-token");
        jail.set_env("TOUCHLINE_ENDPOINT", "http://127.0.0.1:7451");
        jail.set_env("TOUCHLINE_TEST_KAFKA", "127.0.0.1:9092");
        jail.set_env("TOUCHLINE_METRICS__LISTEN", "0.0.0.0:9100");
        // Values are TOML: a string that looks like a number is quoted.
        jail.set_env("TOUCHLINE_KAFKA__GROUP_ID", "\"42\"");
        let config =
            Config::load(Some(Path::new("touchline.toml"))).map_err(|error| error.to_string())?;
        assert_eq!(config.kafka.bootstrap_servers, "from-env:9092");
        assert_eq!(config.ingest.max_batch_events, 10);
        assert_eq!(config.kafka.group_id, "42");
        assert_eq!(
            config.metrics.listen,
            SocketAddr::from(([0, 0, 0, 0], 9100))
        );
        // A bare word is a string (deploy/kubernetes sets the group id to the pod's name).
        jail.set_env("TOUCHLINE_KAFKA__GROUP_ID", "touchline-projector-0");
        let config =
            Config::load(Some(Path::new("touchline.toml"))).map_err(|error| error.to_string())?;
        assert_eq!(config.kafka.group_id, "touchline-projector-0");
        Ok(())
    });
}

#[test]
fn sizes_out_of_range_are_refused() {
    let refused = |change: fn(&mut Config)| {
        let mut config = Config::default();
        change(&mut config);
        config.validate().expect_err("refused").to_string()
    };
    assert!(refused(|c| c.ingest.max_batch_events = 0).contains("ingest.max-batch-events"));
    assert!(
        refused(|c| c.ingest.max_in_flight_batches = usize::MAX / 4)
            .contains("ingest.max-in-flight-batches")
    );
    assert!(
        refused(|c| c.ingest.max_in_flight_bytes = 1000).contains("ingest.max-in-flight-bytes")
    );
    assert!(
        refused(|c| c.ingest.max_in_flight_bytes_per_partner = 1000)
            .contains("ingest.max-in-flight-bytes-per-partner")
    );
    assert!(
        refused(|c| c.ingest.stream_window_events = c.ingest.max_batch_events - 1)
            .contains("ingest.stream-window-events")
    );
    assert!(
        refused(|c| c.ingest.max_streams_per_partner = 0)
            .contains("ingest.max-streams-per-partner")
    );
    assert!(refused(|c| c.ingest.ack_timeout_ms = 0).contains("ingest.ack-timeout-ms"));
    assert!(
        refused(|c| c.ingest.limits.max_event_bytes = 0).contains("ingest.limits.max-event-bytes")
    );
    assert!(refused(|c| c.projector.max_batch = 0).contains("projector.max-batch"));
    assert!(refused(|c| c.projector.rebuild_batch = 0).contains("projector.rebuild-batch"));
    assert!(refused(|c| c.query.max_watches = 0).contains("query.max-watches"));
    assert!(refused(|c| c.ingest.stream_window_bytes = 0).contains("ingest.stream-window-bytes"));
    // sled asserts a page cache of at least 256 bytes: 0 panicked in the store's open.
    assert!(refused(|c| c.store.cache_mib = 0).contains("store.cache-mib"));
    // The kernel refuses keepalive times under a second: every connection was dropped silently.
    assert!(refused(|c| c.server.tcp_keepalive_ms = 500).contains("server.tcp-keepalive-ms"));
    assert!(
        refused(|c| c.server.tcp_keepalive_ms = 40_000_000).contains("server.tcp-keepalive-ms")
    );
    assert!(
        refused(|c| c.server.shutdown_grace_ms = u64::MAX).contains("server.shutdown-grace-ms")
    );
    assert!(
        refused(|c| c.server.shutdown_delay_ms = 3_600_001).contains("server.shutdown-delay-ms")
    );
    assert!(
        refused(|c| c.server.preface_timeout_ms = 3_600_001).contains("server.preface-timeout-ms")
    );
    let mut off = Config::default();
    off.server.tcp_keepalive_ms = 0;
    off.validate().expect("0 turns TCP keepalive off");
    Config::default()
        .validate()
        .expect("the defaults are valid");
}

#[test]
fn an_event_limit_past_what_the_producer_may_send_is_refused() {
    let mut config = Config::default();
    config.ingest.limits.max_event_bytes = 2_000_000;
    let refused = config.validate().expect_err("past message.max.bytes");
    assert!(
        refused.to_string().contains("message.max.bytes is 1000000"),
        "{refused}"
    );
    config
        .kafka
        .producer_properties
        .insert("message.max.bytes".to_owned(), "4000000".to_owned());
    config.validate().expect("raised with it");
    config
        .kafka
        .producer_properties
        .insert("message.max.bytes".to_owned(), "2000100".to_owned());
    assert!(config.validate().is_err(), "no room for the envelope");
    // Read as librdkafka reads it: octal, hexadecimal, trailing characters ignored.
    config.ingest.limits.max_event_bytes = 3_000_000;
    for (value, fits) in [
        ("010000000", false),
        ("0x400000", true),
        ("0x100000", false),
        (" 4000000kb", true),
        ("2000000 ", false),
        ("5000000 ", true),
    ] {
        config
            .kafka
            .producer_properties
            .insert("message.max.bytes".to_owned(), value.to_owned());
        assert_eq!(config.validate().is_ok(), fits, "message.max.bytes={value}");
    }
    // What librdkafka refuses when the producer is made is left to it.
    config
        .kafka
        .producer_properties
        .insert("message.max.bytes".to_owned(), "many".to_owned());
    config.validate().expect("librdkafka's to refuse");
    // A node without ingest does not apply the limit.
    config.ingest.enabled = false;
    config.validate().expect("no ingest, no check");
}

#[test]
fn a_retention_in_other_units_is_refused() {
    for (retention, valid) in [
        (None, true),
        (Some(-1), true),
        (Some(3_600_000), true),
        (Some(30 * 24 * 3_600_000), true),
        (Some(30), false),
        (Some(604_800), false),
        (Some(0), false),
        (Some(-2), false),
    ] {
        let mut config = Config::default();
        config.kafka.retention_ms = retention;
        let checked = config.validate();
        assert_eq!(checked.is_ok(), valid, "{retention:?}: {checked:?}");
        if let Err(refused) = checked {
            assert!(
                refused.to_string().contains("kafka.retention-ms"),
                "{refused}"
            );
        }
    }
}

#[test]
fn integers_are_read_as_librdkafka_reads_them() {
    for (value, read) in [
        ("1000000", Some(1_000_000)),
        ("010000000", Some(2_097_152)),
        ("0x10", Some(16)),
        ("0X1f", Some(31)),
        ("0x", Some(0)),
        ("08", Some(0)),
        ("  +12abc", Some(12)),
        ("-5", Some(-5)),
        ("4294967297", Some(1)),
        ("99999999999999999999", Some(-1)),
        ("", None),
        ("kb", None),
        ("-", None),
    ] {
        assert_eq!(super::librdkafka_integer(value), read, "{value:?}");
    }
}

#[test]
fn weakening_acknowledgements_is_refused() {
    let mut config = Config::default();
    config
        .kafka
        .producer_properties
        .insert("acks".to_owned(), "1".to_owned());
    assert!(config.validate().is_err());
    let mut config = Config::default();
    config
        .kafka
        .properties
        .insert("enable.idempotence".to_owned(), "false".to_owned());
    assert!(config.validate().is_err());
}

/// A producer that would never report a delivery, or refuses every record sent outside a
/// transaction: no event would ever be acknowledged.
#[test]
fn a_producer_that_would_acknowledge_nothing_is_refused() {
    for (name, value, says) in [
        (
            "delivery.report.only.error",
            "true",
            "delivery.report.only.error=true is refused",
        ),
        ("delivery.report.only.error", "1", "no event would ever"),
        ("transactional.id", "touchline", "not transactional"),
        ("allow.auto.create.topics", "true", "created by Touchline"),
    ] {
        for common in [false, true] {
            let mut config = Config::default();
            let table = if common {
                &mut config.kafka.properties
            } else {
                &mut config.kafka.producer_properties
            };
            table.insert(name.to_owned(), value.to_owned());
            let refused = config.validate().expect_err(name).to_string();
            assert!(refused.contains(says), "{name}={value}: {refused}");
        }
    }
    let mut config = Config::default();
    config
        .kafka
        .producer_properties
        .insert("delivery.report.only.error".to_owned(), "false".to_owned());
    config.validate().expect("the default, repeated");
}

#[test]
fn a_consumer_that_would_skip_records_is_refused() {
    let mut config = Config::default();
    config
        .kafka
        .consumer_properties
        .insert("auto.offset.reset".to_owned(), "latest".to_owned());
    let refused = config.validate().expect_err("latest skips records");
    assert!(
        refused.to_string().contains("auto.offset.reset"),
        "{refused}"
    );
    config
        .kafka
        .consumer_properties
        .insert("auto.offset.reset".to_owned(), "earliest".to_owned());
    config
        .validate()
        .expect("earliest is what the projector uses");
    // As librdkafka reads them: without case.
    for (name, value) in [
        ("auto.offset.reset", "EARLIEST"),
        ("enable.idempotence", "True"),
        ("acks", "ALL"),
    ] {
        let mut config = Config::default();
        config
            .kafka
            .properties
            .insert(name.to_owned(), value.to_owned());
        config.validate().expect(value);
    }
}

#[test]
fn consumer_properties_the_projector_depends_on_are_refused_with_other_values() {
    for (name, value) in [
        ("isolation.level", "read_uncommitted"),
        ("enable.auto.commit", "true"),
        ("enable.auto.offset.store", "true"),
        ("enable.partition.eof", "true"),
    ] {
        let mut config = Config::default();
        config
            .kafka
            .consumer_properties
            .insert(name.to_owned(), value.to_owned());
        let refused = config.validate().expect_err(name).to_string();
        assert!(refused.contains(&format!("{name}={value}")), "{refused}");
        // In the properties of every client too.
        let mut config = Config::default();
        config
            .kafka
            .properties
            .insert(name.to_owned(), value.to_owned());
        assert!(
            config.validate().is_err(),
            "{name}={value} in kafka.properties"
        );
    }
    // What the projector sets, in any spelling librdkafka reads the same.
    for (name, value) in [
        ("isolation.level", "read_committed"),
        ("isolation.level", "READ_COMMITTED"),
        ("enable.auto.commit", "0"),
        ("enable.auto.offset.store", "False"),
        ("enable.partition.eof", "f"),
    ] {
        let mut config = Config::default();
        config
            .kafka
            .consumer_properties
            .insert(name.to_owned(), value.to_owned());
        config.validate().expect(value);
    }
}

#[test]
fn guarded_properties_are_guarded_under_every_spelling() {
    type Section = fn(&mut Config) -> &mut BTreeMap<String, String>;
    let refused = |section: Section, name: &str, value: &str| {
        let mut config = Config::default();
        section(&mut config).insert(name.to_owned(), value.to_owned());
        config.validate().map_err(|error| error.to_string()).err()
    };
    let consumer: Section = |config| &mut config.kafka.consumer_properties;
    let producer: Section = |config| &mut config.kafka.producer_properties;
    let common: Section = |config| &mut config.kafka.properties;
    for (section, name, value, says) in [
        (
            consumer,
            "topic.auto.offset.reset",
            "latest",
            "auto.offset.reset",
        ),
        (
            common,
            "topic.auto.offset.reset",
            "end",
            "auto.offset.reset",
        ),
        (producer, "request.required.acks", "1", "acks"),
        (producer, "topic.acks", "0", "acks"),
        (common, "topic.request.required.acks", "1", "acks"),
    ] {
        let refused = refused(section, name, value);
        assert!(
            refused.as_deref().is_some_and(|error| error.contains(says)),
            "{name}={value}: {refused:?}"
        );
    }
    assert_eq!(
        refused(consumer, "topic.auto.offset.reset", "earliest"),
        None
    );
    assert_eq!(refused(producer, "request.required.acks", "all"), None);
    // A global property whose name starts with `topic.` is its own.
    assert_eq!(
        refused(common, "topic.metadata.refresh.interval.ms", "1000"),
        None
    );

    // Two spellings of one property would be applied in no fixed order.
    let mut config = Config::default();
    config
        .kafka
        .consumer_properties
        .insert("auto.offset.reset".to_owned(), "earliest".to_owned());
    config
        .kafka
        .consumer_properties
        .insert("topic.auto.offset.reset".to_owned(), "smallest".to_owned());
    let twice = config.validate().expect_err("two spellings").to_string();
    assert!(twice.contains("set the same property"), "{twice}");
    // An alias of what Touchline sets: librdkafka's older name.
    let mut config = Config::default();
    config.kafka.properties.insert(
        "metadata.broker.list".to_owned(),
        "127.0.0.1:9092".to_owned(),
    );
    config
        .kafka
        .properties
        .insert("bootstrap.servers".to_owned(), "127.0.0.1:9092".to_owned());
    let twice = config.validate().expect_err("two spellings").to_string();
    assert!(twice.contains("bootstrap.servers"), "{twice}");

    // Repeating kafka.bootstrap-servers changes nothing.
    assert_eq!(
        refused(
            producer,
            "bootstrap.servers",
            &Config::default().kafka.bootstrap_servers
        ),
        None
    );
    // Other brokers are refused, under any name, in any table.
    for (section, name) in [
        (common, "bootstrap.servers"),
        (producer, "metadata.broker.list"),
        (consumer, "bootstrap.servers"),
    ] {
        let refused = refused(section, name, "elsewhere:9092");
        assert!(
            refused
                .as_deref()
                .is_some_and(|error| error.contains("kafka.bootstrap-servers")),
            "{name}: {refused:?}"
        );
    }
    // Another consumer group than kafka.group-id likewise; repeating it changes nothing.
    for section in [common, consumer] {
        let other = refused(section, "group.id", "elsewhere");
        assert!(
            other
                .as_deref()
                .is_some_and(|error| error.contains("kafka.group-id")),
            "{other:?}"
        );
        assert_eq!(
            refused(section, "group.id", &Config::default().kafka.group_id),
            None
        );
    }
    // A property spelled as a key, from a variable (TOUCHLINE_KAFKA__PROPERTIES__SECURITY_PROTOCOL).
    let dashed = refused(common, "security-protocol", "SSL");
    assert!(
        dashed
            .as_deref()
            .is_some_and(|error| error.contains("TOUCHLINE_KAFKA__PROPERTIES='")),
        "{dashed:?}"
    );
}

#[test]
fn an_in_sync_minimum_above_the_replicas_is_refused() {
    let mut config = Config::default();
    config.kafka.min_insync_replicas = Some(2);
    let refused = config.validate().expect_err("2 of 1 replica").to_string();
    assert!(refused.contains("kafka.min-insync-replicas"), "{refused}");
    config.kafka.replication_factor = 3;
    config.validate().expect("2 of 3 replicas");
    config.kafka.min_insync_replicas = Some(0);
    assert!(config.validate().is_err());
    config.kafka.min_insync_replicas = None;
    config.kafka.replication_factor = 0;
    assert!(config.validate().is_err());
}

#[test]
fn a_query_role_without_its_projector_is_refused() {
    let mut config = Config::default();
    config.projector.enabled = false;
    assert!(config.validate().is_err());
}

#[test]
fn a_log_filter_that_would_not_log_what_it_says_is_refused() {
    for (filter, says) in [
        ("", "empty"),
        ("  ", "empty"),
        ("info,rdkafka=loud", "not a tracing filter"),
    ] {
        let mut config = Config::default();
        config.log.filter = filter.to_owned();
        let refused = format!("{:#}", config.validate().expect_err("refused"));
        assert!(refused.contains(says), "{filter:?}: {refused}");
    }
    let mut config = Config::default();
    config.log.filter = "warn,touchline::audit=info".to_owned();
    config.validate().expect("a filter");
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail fixes the closure type"
)]
fn server_tls_comes_from_the_file_and_the_environment() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "touchline.toml",
            "[server.tls]\ncert-file = \"server.pem\"\nkey-file = \"server.key\"\n",
        )?;
        jail.set_env("TOUCHLINE_SERVER__TLS__CLIENT_CA_FILE", "clients.pem");
        let config =
            Config::load(Some(Path::new("touchline.toml"))).map_err(|error| error.to_string())?;
        let tls = TlsConfig {
            cert_file: "server.pem".into(),
            key_file: "server.key".into(),
            client_ca_file: Some("clients.pem".into()),
        };
        assert_eq!(config.server.tls.as_ref(), Some(&tls));
        let printed: Config = toml::from_str(&config.to_toml().map_err(|e| e.to_string())?)
            .map_err(|error| error.to_string())?;
        assert_eq!(printed.server.tls, Some(tls));
        Ok(())
    });
    // Both files are required, and nothing else is known.
    assert!(toml::from_str::<Config>("[server.tls]\ncert-file = \"a.pem\"\n").is_err());
    assert!(
        toml::from_str::<Config>(
            "[server.tls]\ncert-file = \"a.pem\"\nkey-file = \"a.key\"\nca-file = \"c.pem\"\n"
        )
        .is_err()
    );
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail fixes the closure type"
)]
fn secret_kafka_properties_come_from_the_environment_and_are_never_printed() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "touchline.toml",
            "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.username\" = \"touchline\"\n",
        )?;
        // A property name holds dots: the whole table is one TOML value, merged into the file's.
        jail.set_env(
            "TOUCHLINE_KAFKA__PROPERTIES",
            r#"{"sasl.password" = "s3cret", "ssl.key.pem" = "-----BEGIN PRIVATE KEY-----"}"#,
        );
        jail.set_env(
            "TOUCHLINE_KAFKA__CONSUMER_PROPERTIES",
            r#"{"sasl.oauthbearer.client.secret" = "hush"}"#,
        );
        let config =
            Config::load(Some(Path::new("touchline.toml"))).map_err(|error| error.to_string())?;
        let property = |key: &str| config.kafka.properties.get(key).map(String::as_str);
        assert_eq!(property("sasl.password"), Some("s3cret"));
        assert_eq!(property("security.protocol"), Some("SASL_SSL"));
        assert_eq!(property("sasl.username"), Some("touchline"));
        let printed = config.to_toml().map_err(|error| error.to_string())?;
        for secret in ["s3cret", "BEGIN PRIVATE KEY", "hush"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(
            printed.contains("SASL_SSL") && printed.contains("<redacted>"),
            "{printed}"
        );
        Ok(())
    });
}

#[test]
fn every_secret_property_of_librdkafka_is_redacted() {
    // The secrets among librdkafka 2.12's properties (its CONFIGURATION.md).
    for secret in [
        "sasl.password",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl.keystore.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.client.credentials.client.secret",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.assertion.private.key.pem",
        "sasl.oauthbearer.config",
        "sasl.jaas.config",
    ] {
        assert!(is_secret_property(secret), "{secret}");
    }
    for shown in [
        "security.protocol",
        "sasl.username",
        "sasl.mechanisms",
        "ssl.ca.location",
        "ssl.key.location",
    ] {
        assert!(!is_secret_property(shown), "{shown}");
    }
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail fixes the closure type"
)]
fn kubernetes_service_links_are_not_configuration_but_typos_still_are_refused() {
    figment::Jail::expect_with(|jail| {
        // What Kubernetes sets for Services named touchline and touchline-ingest.
        for (name, value) in [
            ("TOUCHLINE_SERVICE_HOST", "10.0.0.1"),
            ("TOUCHLINE_SERVICE_PORT", "7451"),
            ("TOUCHLINE_SERVICE_PORT_GRPC", "7451"),
            ("TOUCHLINE_PORT", "tcp://10.0.0.1:7451"),
            ("TOUCHLINE_PORT_7451_TCP", "tcp://10.0.0.1:7451"),
            ("TOUCHLINE_PORT_7451_TCP_PROTO", "tcp"),
            ("TOUCHLINE_PORT_7451_TCP_PORT", "7451"),
            ("TOUCHLINE_PORT_7451_TCP_ADDR", "10.0.0.1"),
            ("TOUCHLINE_INGEST_SERVICE_HOST", "10.0.0.2"),
            ("TOUCHLINE_INGEST_PORT_7451_TCP_ADDR", "10.0.0.2"),
        ] {
            jail.set_env(name, value);
        }
        let config = Config::load(None).map_err(|error| format!("{error:#}"))?;
        assert_eq!(config, Config::default());
        // A key with one underscore where two belong is still an unknown key.
        jail.set_env("TOUCHLINE_KAFKA_BOOTSTRAP_SERVERS", "broker:9092");
        assert!(Config::load(None).is_err());
        jail.clear_env();
        // A table in a variable: keys in double quotes (figment's grammar, as the README says).
        jail.set_env(
            "TOUCHLINE_KAFKA__PROPERTIES",
            r#"{"sasl.password" = "p", "linger.ms" = "5"}"#,
        );
        let config = Config::load(None).map_err(|error| format!("{error:#}"))?;
        assert_eq!(
            config
                .kafka
                .properties
                .get("sasl.password")
                .map(String::as_str),
            Some("p")
        );
        jail.clear_env();
        // An empty level (three underscores, two at the end) was dropped without a word.
        for name in [
            "TOUCHLINE___KAFKA__BOOTSTRAP_SERVERS",
            "TOUCHLINE_KAFKA____TOPIC",
            "TOUCHLINE_KAFKA__",
        ] {
            jail.set_env(name, "broker:9092");
            let refused = format!("{:#}", Config::load(None).expect_err("an empty level"));
            assert!(
                refused.contains(name) && refused.contains("empty level"),
                "{refused}"
            );
            jail.clear_env();
        }
        // A name that ends in _PORT without the address Kubernetes writes there is a typo too.
        jail.set_env("TOUCHLINE_METRICS_PORT", "9100");
        let typo = format!("{:#}", Config::load(None).expect_err("a typo"));
        assert!(typo.contains("metrics-port"), "{typo}");
        Ok(())
    });
}

#[test]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail fixes the closure type"
)]
fn a_config_error_quotes_no_value_but_names_its_key() {
    figment::Jail::expect_with(|jail| {
        // Tokens pasted where their hashes belong: a string for a list, and a value that does
        // not parse as TOML.
        for text in [
            "[admin]\ntoken-sha256 = \"plain-secret-xyz\"\n",
            "[admin]\ntoken-sha256 = [plain-secret-xyz]\n",
        ] {
            jail.create_file("touchline.toml", text)?;
            let error = Config::load(Some(Path::new("touchline.toml"))).expect_err("refused");
            let chain = format!("{error:#}");
            assert!(!chain.contains("plain-secret-xyz"), "{chain}");
            assert!(
                error.to_string().contains("invalid configuration"),
                "{error}"
            );
            assert!(chain.contains("touchline.toml"), "{chain}");
        }
        jail.create_file(
            "touchline.toml",
            "[admin]\ntoken-sha256 = \"plain-secret-xyz\"\n",
        )?;
        let chain = format!(
            "{:#}",
            Config::load(Some(Path::new("touchline.toml"))).expect_err("refused")
        );
        assert!(chain.contains("admin.token-sha256"), "{chain}");
        assert!(chain.contains("found a string"), "{chain}");
        Ok(())
    });
}

#[test]
fn a_node_s_config_file_is_a_regular_file_and_a_command_s_may_be_a_pipe() -> anyhow::Result<()> {
    let error = Config::load(Some(Path::new("/dev/zero"))).expect_err("a device");
    assert!(
        format!("{error:#}").contains("not a regular file"),
        "{error:#}"
    );
    // Read once, a device is bounded.
    let error = Config::load_once(Some(Path::new("/dev/zero"))).expect_err("too large");
    assert!(format!("{error:#}").contains("larger than"), "{error:#}");
    #[cfg(unix)]
    {
        // A FIFO with a writer, as `-c <(envsubst < touchline.toml)` gives.
        let dir = tempfile::tempdir()?;
        let fifo = dir.path().join("touchline.toml");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()?
                .success()
        );
        let writing = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, "[log]\nformat = \"json\"\n"))
        };
        let config = Config::load_once(Some(&fifo))?;
        assert_eq!(config.log.format, LogFormat::Json);
        writing
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    }
    Ok(())
}
