-- Everything made from one template (edit the literal): its candidates, dedup fate and MP match.
-- cgwgan sql -f sql/examples/candidates_from_template.sql
SELECT c.template_id, c.candidate_id, c.chemical_system, c.reduced_formula,
       c.wyckoff_species_sequence, c.spacegroup_number, c.n_atoms,
       d.candidate_id IS NOT NULL AS is_unique, d.n_folded, d.is_known_in_mp, d.mp_material_id
FROM candidates AS c
LEFT JOIN candidates_dedup AS d USING (candidate_id)
WHERE c.template_id = (SELECT min(template_id) FROM candidates)  -- or a literal 'tpl-...'
ORDER BY c.candidate_id;
