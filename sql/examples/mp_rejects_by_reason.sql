-- Quarantined input rows by reason (mp_structures_rejects), with an example row of each, and the
-- structures whose ASU round trip failed (mp_symmetry), by the reason before the ':'.
SELECT 'mp_structures_rejects' AS stage, reason, count(*) AS n_rows,
       min(source_ref) AS example_source_ref, any_value(detail) AS example_detail
FROM mp_structures_rejects
GROUP BY reason
UNION ALL
SELECT 'mp_symmetry_round_trip' AS stage, split_part(round_trip_error, ':', 1) AS reason, count(*) AS n_rows,
       min(material_id) AS example_source_ref, any_value(round_trip_error) AS example_detail
FROM mp_symmetry
WHERE NOT is_round_trip_ok
GROUP BY 2
ORDER BY stage, n_rows DESC;
