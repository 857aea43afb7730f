-- Shortlist entries that pass every screen: within 0.1 eV/atom of the hull and dynamically stable
-- (phonon minimum frequency above the threshold), one row per candidate and surrogate.
CREATE OR REPLACE VIEW shortlist_stable AS
SELECT s.*
FROM shortlist AS s
WHERE s.e_above_hull_ev_per_atom <= 0.1
  AND s.is_dynamically_stable;
