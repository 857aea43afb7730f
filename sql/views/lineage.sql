-- Lineage of DFT results (issue 6). Loaded into the catalog after the table views, in file order.
-- A view whose tables do not exist yet is skipped by the loader (lib/store.py extra_sql).
-- Statements are split on semicolons: keep them out of comments.

-- The newest ingest of each DFT run folder
CREATE OR REPLACE VIEW dft_results_latest AS
SELECT *
FROM dft_results
QUALIFY row_number() OVER (PARTITION BY run_name ORDER BY ingested_at DESC, result_id DESC) = 1;

-- Result -> candidate -> template -> generator checkpoint -> training snapshot -> MP source
CREATE OR REPLACE VIEW dft_lineage AS
WITH cand AS (
    SELECT candidate_id, template_id, checkpoint_id, chemical_system, formula,
           spacegroup_number, wyckoff_species_sequence
    FROM candidates
    QUALIFY row_number() OVER (PARTITION BY candidate_id ORDER BY chemical_system) = 1
), tpl AS (
    SELECT template_id, checkpoint_id, spacegroup_number, wyckoff_sequence
    FROM templates
    QUALIFY row_number() OVER (PARTITION BY template_id ORDER BY checkpoint_id) = 1
), ckpt AS (
    SELECT checkpoint_id, path, training_snapshot_id, CAST(created_at AS VARCHAR) AS created_at
    FROM wgan_checkpoints
    QUALIFY row_number() OVER (PARTITION BY checkpoint_id ORDER BY created_at DESC) = 1
), snap AS (
    SELECT snapshot_id, any_value(source) AS mp_source, count(*) AS mp_n_structures
    FROM mp_structures
    GROUP BY snapshot_id
)
SELECT
    r.result_id, r.run_name, r.status, r.reason, r.is_linked, r.candidate_id,
    r.reduced_formula AS dft_reduced_formula, r.final_energy_ev, r.energy_per_atom_ev,
    r.formation_energy_per_atom_ev, r.min_frequency_thz, r.is_phonon_stable, r.phonon_source,
    r.reference_source, r.reference_entry_ids, r.input_run_id, r.ingested_at,
    coalesce(c.chemical_system, r.chemical_system) AS chemical_system,
    c.formula AS candidate_formula, c.spacegroup_number AS candidate_spacegroup_number,
    c.wyckoff_species_sequence,
    coalesce(c.template_id, r.template_id) AS template_id,
    t.spacegroup_number AS template_spacegroup_number, t.wyckoff_sequence AS template_wyckoff_sequence,
    coalesce(c.checkpoint_id, t.checkpoint_id, r.checkpoint_id) AS checkpoint_id,
    k.path AS checkpoint_path, k.created_at AS checkpoint_created_at, k.training_snapshot_id,
    s.mp_source, s.mp_n_structures
FROM dft_results_latest r
LEFT JOIN cand c ON c.candidate_id = r.candidate_id
LEFT JOIN tpl t ON t.template_id = coalesce(c.template_id, r.template_id)
LEFT JOIN ckpt k ON k.checkpoint_id = coalesce(c.checkpoint_id, t.checkpoint_id, r.checkpoint_id)
LEFT JOIN snap s ON s.snapshot_id = k.training_snapshot_id;

-- How each surrogate saw each candidate: prescreen energy and rank, relaxation, shortlist rank and verdict
CREATE OR REPLACE VIEW candidate_surrogate_rankings AS
WITH pre AS (
    SELECT p.candidate_id, p.surrogate_name, p.surrogate_sha256, p.code_version,
           p.energy_per_atom_ev, p.status,
           CASE WHEN p.status = 'ok' THEN rank() OVER (
               PARTITION BY p.surrogate_name, c.chemical_system, p.status = 'ok'
               ORDER BY p.energy_per_atom_ev) END AS prescreen_rank,
           c.chemical_system
    FROM prescreen p
    LEFT JOIN (SELECT DISTINCT candidate_id, chemical_system FROM candidates) c USING (candidate_id)
)
SELECT
    pre.chemical_system, pre.candidate_id, pre.surrogate_name, pre.surrogate_sha256,
    pre.code_version AS screening_code_version,
    pre.energy_per_atom_ev AS prescreen_energy_per_atom_ev, pre.status AS prescreen_status,
    pre.prescreen_rank,
    rl.energy_per_atom_ev AS relaxed_energy_per_atom_ev, rl.is_converged AS is_relax_converged,
    rl.status AS relax_status,
    s.rank AS shortlist_rank, s.e_above_hull_ev_per_atom,
    s.formation_energy_per_atom_ev AS surrogate_formation_energy_per_atom_ev,
    s.min_frequency_thz AS surrogate_min_frequency_thz, s.is_dynamically_stable
FROM pre
LEFT JOIN relaxed rl ON rl.candidate_id = pre.candidate_id AND rl.surrogate_name = pre.surrogate_name
LEFT JOIN shortlist s ON s.candidate_id = pre.candidate_id AND s.surrogate_name = pre.surrogate_name;
