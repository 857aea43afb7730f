-- Generated crystal templates per space group and Wyckoff sequence, newest generation runs included.
-- Run: cgwgan sql -f sql/examples/templates_by_spacegroup.sql
SELECT
    spacegroup_number,
    crystal_system,
    count(*)                                  AS n_templates,
    count(DISTINCT wyckoff_sequence)          AS n_wyckoff_sequences,
    round(avg(n_atoms), 1)                    AS mean_atoms,
    round(avg(number_density_per_a3), 4)      AS mean_density_per_a3,
    round(min(min_distance_a), 2)             AS shortest_distance_a,
    arg_max(wyckoff_sequence, n_atoms)        AS largest_cell_sequence
FROM templates
GROUP BY spacegroup_number, crystal_system
ORDER BY n_templates DESC
LIMIT 30;
