package dev.weir.examples;

import io.apicurio.registry.serde.avro.AvroKafkaDeserializer;
import io.apicurio.registry.serde.config.SerdeConfig;
import java.time.Duration;
import java.time.Instant;
import java.util.HashSet;
import java.util.List;
import java.util.Properties;
import java.util.Set;
import java.util.UUID;
import org.apache.avro.LogicalType;
import org.apache.avro.LogicalTypes;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericRecord;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

/**
 * Reads weir's output topics with a stock deserializer and prints each event once.
 *
 * <p>Apicurio's {@link AvroKafkaDeserializer} reads the Confluent wire format weir writes: magic
 * byte 0, a 4-byte schema id (the registry's content id, which is what the Confluent-compatible
 * API hands out), then Avro binary. It fetches writer schemas from the registry's native v3 API.
 * Union topics come back as the {@link GenericRecord} of the branch that was written; its full
 * name says which event it is.
 */
public final class ConsumeWeirEvents {
  static final List<String> OUTPUT_TOPICS =
      List.of(
          "weir.workflows.v1",
          "weir.node-ready.v1",
          "weir.run-events.v1",
          "weir.cache-answers.v1",
          "weir.dlq.v1");

  public static void main(String[] args) {
    String bootstrap = args.length > 0 ? args[0] : "127.0.0.1:9092";
    String registry = args.length > 1 ? args[1] : "http://127.0.0.1:8081/apis/registry/v3";
    String prefix = args.length > 2 ? args[2] : "";
    long idleExitSeconds = args.length > 3 ? Long.parseLong(args[3]) : 0;

    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(ConsumerConfig.GROUP_ID_CONFIG, "analytics-java-example-" + UUID.randomUUID());
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    // Keys are UTF-8 strings (workflow_id, run_id, workspace_id); on the DLQ they are the
    // original record's key bytes, so read bytes and decode where needed.
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, AvroKafkaDeserializer.class.getName());
    props.put(SerdeConfig.REGISTRY_URL, registry);
    // The Confluent framing: a 4-byte id that is a content id (both are the defaults in
    // Apicurio 3; spelled out because they are the contract).
    props.put(SerdeConfig.ID_HANDLER, "io.apicurio.registry.serde.Default4ByteIdHandler");
    props.put(SerdeConfig.USE_ID, "contentId");

    Set<String> seen = new HashSet<>(); // at least once: dedupe on event_id (bound it in production)
    try (KafkaConsumer<byte[], GenericRecord> consumer = new KafkaConsumer<>(props)) {
      consumer.subscribe(OUTPUT_TOPICS.stream().map(t -> prefix + t).toList());
      Instant lastNews = Instant.now();
      while (idleExitSeconds <= 0
          || Duration.between(lastNews, Instant.now()).getSeconds() < idleExitSeconds) {
        for (ConsumerRecord<byte[], GenericRecord> r : consumer.poll(Duration.ofSeconds(1))) {
          lastNews = Instant.now();
          GenericRecord event = r.value();
          String eventId = event.get("event_id").toString();
          if (!seen.add(eventId)) {
            continue; // a re-delivery with identical content
          }
          System.out.println(describe(r, event));
        }
      }
    }
  }

  /** One line per event: where it was, its type (the record's full name), and its fields. */
  static String describe(ConsumerRecord<byte[], GenericRecord> r, GenericRecord event) {
    Schema schema = event.getSchema();
    StringBuilder out = new StringBuilder();
    out.append(r.topic()).append('[').append(r.partition()).append("]@").append(r.offset());
    out.append(" type=").append(schema.getFullName());
    out.append(" key=").append(r.key() == null ? "null" : new String(r.key(), java.nio.charset.StandardCharsets.UTF_8));
    for (Schema.Field f : schema.getFields()) {
      Object v = event.get(f.name());
      out.append(' ').append(f.name()).append('=').append(render(f.schema(), v));
    }
    return out.toString();
  }

  /** Generic records carry logical types as their base types: timestamp-micros is a long. */
  static String render(Schema schema, Object v) {
    LogicalType logical = schema.getLogicalType();
    if (v instanceof Long micros && logical instanceof LogicalTypes.TimestampMicros) {
      return Instant.ofEpochSecond(0, micros * 1000).toString();
    }
    if (v instanceof java.nio.ByteBuffer b) {
      return b.remaining() + " bytes";
    }
    if (schema.getType() == Schema.Type.UNION && v != null) {
      for (Schema branch : schema.getTypes()) {
        if (branch.getType() != Schema.Type.NULL) {
          return render(branch, v);
        }
      }
    }
    String s = String.valueOf(v);
    return s.length() > 60 ? s.substring(0, 60) + "..." : s;
  }

  private ConsumeWeirEvents() {}
}
