-- Structures by number of asymmetric-unit (Wyckoff) sites: the GAN trains on 1-4 sites above P1.
SELECT n_asu_sites,
       count(*)                                                  AS structures,
       count(*) FILTER (WHERE spacegroup_number > 1)              AS above_p1,
       count(*) FILTER (WHERE is_round_trip_ok)                   AS round_trip_ok,
       round(avg(n_atoms), 1)                                     AS mean_atoms_conventional_cell
FROM mp_symmetry
GROUP BY n_asu_sites
ORDER BY n_asu_sites NULLS LAST;
