-- Every candidate of one reduced formula (edit the literal), smallest cells first.
-- cgwgan sql -f sql/examples/candidates_of_formula.sql
SELECT candidate_id, template_id, spacegroup_number, n_atoms, wyckoff_species_sequence,
       round(a_a, 3) AS a_a, round(b_a, 3) AS b_a, round(c_a, 3) AS c_a,
       round(volume_a3, 2) AS volume_a3, volume_mode, fingerprint
FROM candidates
WHERE reduced_formula = 'BaRuO3'
ORDER BY n_atoms, spacegroup_number DESC, candidate_id
LIMIT 200;
