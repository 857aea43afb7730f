-- Structures per space group in mp_symmetry, with how many round-trip through their ASU and
-- how many made it into the GAN's training table.
SELECT s.spacegroup_number,
       any_value(s.crystal_system)                       AS crystal_system,
       count(*)                                          AS structures,
       count(*) FILTER (WHERE s.is_round_trip_ok)        AS round_trip_ok,
       count(t.material_id)                              AS training_rows
FROM mp_symmetry AS s
LEFT JOIN training_templates AS t USING (material_id)
GROUP BY s.spacegroup_number
ORDER BY structures DESC, s.spacegroup_number
LIMIT 40;
