-- Candidates per space group and reduced formula, with how many survived dedup and how many are known in MP.
-- cgwgan sql -f sql/examples/candidates_by_spacegroup_formula.sql
SELECT c.chemical_system,
       c.spacegroup_number,
       c.reduced_formula,
       count(*)                                   AS candidates,
       count(d.candidate_id)                      AS unique_candidates,
       count(*) FILTER (WHERE d.is_known_in_mp)   AS known_in_mp
FROM candidates AS c
LEFT JOIN candidates_dedup AS d USING (candidate_id)
GROUP BY ALL
ORDER BY candidates DESC
LIMIT 50;
