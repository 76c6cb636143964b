-- Consumer groups carry the environment's topic prefix (kafka.topic_prefix + the processor's
-- base group), so deployments sharing a Kafka cluster under different prefixes never share a
-- group. Positions are the truth (a partition with no stored position starts from the
-- beginning), so the positions of prefixed deployments move to their new group names here;
-- without this they would re-read their topics from the start. Unprefixed deployments keep
-- their group names and rows.
UPDATE weir_consumer_positions AS p
SET consumer_group = left(p.topic, length(p.topic) - length(b.base)) || p.consumer_group
FROM (VALUES ('weir-materializer', 'weir.patches.v1'),
             ('weir-coordinator', 'weir.completions.v1'),
             ('weir-cache', 'weir.cache.v1')) AS b(grp, base)
WHERE p.consumer_group = b.grp
  AND p.topic <> b.base
  AND right(p.topic, length(b.base)) = b.base;
