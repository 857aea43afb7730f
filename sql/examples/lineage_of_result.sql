-- Where did this discovered crystal come from, and how did each surrogate rank it?
-- One row per (DFT result, surrogate): the chain result -> candidate -> template -> generator
-- checkpoint -> training snapshot -> MP source, and each surrogate's prescreen rank, shortlist
-- rank, energy above hull and phonon verdict next to the DFT verdict.
-- Put a candidate id in params (e.g. 'cand-0123abcd...') or leave NULL for every result.
WITH params AS (SELECT CAST(NULL AS VARCHAR) AS candidate_id)
SELECT
    l.candidate_id,
    l.run_name,
    l.status,
    l.dft_reduced_formula,
    l.formation_energy_per_atom_ev AS dft_formation_energy_per_atom_ev,
    l.min_frequency_thz AS dft_min_frequency_thz,
    l.is_phonon_stable AS dft_is_phonon_stable,
    l.chemical_system,
    l.wyckoff_species_sequence,
    l.template_id,
    l.template_wyckoff_sequence,
    l.checkpoint_id,
    l.checkpoint_path,
    l.training_snapshot_id,
    l.mp_source,
    r.surrogate_name,
    r.surrogate_sha256,
    r.prescreen_rank,
    r.shortlist_rank,
    r.e_above_hull_ev_per_atom,
    r.surrogate_formation_energy_per_atom_ev,
    r.is_dynamically_stable AS surrogate_is_dynamically_stable
FROM dft_lineage l
CROSS JOIN params
LEFT JOIN candidate_surrogate_rankings r ON r.candidate_id = l.candidate_id
WHERE params.candidate_id IS NULL OR l.candidate_id = params.candidate_id
ORDER BY l.candidate_id, r.shortlist_rank NULLS LAST, r.surrogate_name
