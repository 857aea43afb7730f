-- Top 20 novel, distinct structures per surrogate by energy above hull, then formation energy, with the
-- phonon verdict and charge balance. Left out: candidates that relaxed into a better-ranked structure
-- (`duplicate_of`) and those that relaxed into a known phase (`is_novel` false: MP, the surrogate's
-- relaxed references or a DFT result; see `known_material_id`). Drop the `is_novel` line to see them.
-- cgwgan sql -f sql/examples/shortlist_top.sql
SELECT surrogate_name, rank, unique_rank, candidate_id, formula, spacegroup_number_relaxed,
       round(e_above_hull_ev_per_atom, 4) AS e_above_hull_ev_per_atom,
       round(formation_energy_per_atom_ev, 4) AS formation_energy_per_atom_ev,
       round(min_frequency_thz, 3) AS min_frequency_thz, is_dynamically_stable, charge_balanced, oxidation_states
FROM shortlist
WHERE duplicate_of IS NULL
  AND is_novel
QUALIFY row_number() OVER (PARTITION BY surrogate_name ORDER BY rank) <= 20
ORDER BY surrogate_name, rank;
