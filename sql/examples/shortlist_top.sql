-- Top 20 distinct structures per surrogate by energy above hull, then formation energy, with the
-- phonon verdict. Candidates that relaxed into a better-ranked structure carry `duplicate_of`.
-- cgwgan sql -f sql/examples/shortlist_top.sql
SELECT surrogate_name, rank, unique_rank, candidate_id, formula, spacegroup_number_relaxed,
       round(e_above_hull_ev_per_atom, 4) AS e_above_hull_ev_per_atom,
       round(formation_energy_per_atom_ev, 4) AS formation_energy_per_atom_ev,
       round(min_frequency_thz, 3) AS min_frequency_thz, is_dynamically_stable
FROM shortlist
WHERE duplicate_of IS NULL AND unique_rank <= 20
ORDER BY surrogate_name, rank;
