-- International addresses: the worker now stores an address whose domain was written with
-- A-labels (`xn--…`) with that domain decoded to U-labels, as it stores a domain written in
-- Unicode, so both spellings are one address for suppressions, rate limits and searches.
-- This re-stores what earlier releases kept as given: suppression entries and ledger
-- recipients with an `xn--` label. A label that is not valid Punycode is left as it is.
-- A suppression whose decoded address already has an entry is merged into it (the existing
-- entry is kept: it is the one the worker compares with already).
--
-- PostgreSQL has no Punycode decoder, so this migration brings one (RFC 3492) as temporary
-- functions, dropped at the end: nothing of it stays in the schema.
SET LOCAL lock_timeout = '5s';

CREATE FUNCTION pg_temp.punycode_adapt(delta bigint, numpoints int, first boolean)
RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    k int := 0;
BEGIN
    delta := CASE WHEN first THEN delta / 700 ELSE delta / 2 END;
    delta := delta + delta / numpoints;
    WHILE delta > 455 LOOP  -- ((base - tmin) * tmax) / 2
        delta := delta / 35;
        k := k + 36;
    END LOOP;
    RETURN k + (36 * delta) / (delta + 38);
END;
$$;

-- One label's Punycode (without `xn--`) to Unicode; NULL when it is not valid Punycode.
CREATE FUNCTION pg_temp.punycode_decode(input text)
RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    last_dash int := position('-' IN reverse(input));
    points int[] := '{}';
    n bigint := 128;
    i bigint := 0;
    bias int := 72;
    pos int;
    oldi bigint;
    w bigint;
    k int;
    c int;
    digit int;
    t int;
    size int;
BEGIN
    IF last_dash > 0 THEN
        last_dash := length(input) - last_dash + 1;
        FOR pos IN 1 .. last_dash - 1 LOOP
            points := points || ascii(substr(input, pos, 1));
        END LOOP;
    END IF;
    pos := last_dash + 1;
    WHILE pos <= length(input) LOOP
        oldi := i;
        w := 1;
        k := 36;
        LOOP
            IF pos > length(input) THEN
                RETURN NULL;
            END IF;
            c := ascii(substr(input, pos, 1));
            pos := pos + 1;
            digit := CASE
                WHEN c BETWEEN 48 AND 57 THEN c - 22
                WHEN c BETWEEN 97 AND 122 THEN c - 97
                WHEN c BETWEEN 65 AND 90 THEN c - 65
            END;
            IF digit IS NULL OR i > 1114111 * 64 THEN
                RETURN NULL;
            END IF;
            i := i + digit * w;
            t := CASE WHEN k <= bias THEN 1 WHEN k >= bias + 26 THEN 26 ELSE k - bias END;
            EXIT WHEN digit < t;
            w := w * (36 - t);
            k := k + 36;
        END LOOP;
        size := coalesce(array_length(points, 1), 0) + 1;
        bias := pg_temp.punycode_adapt(i - oldi, size, oldi = 0);
        n := n + i / size;
        i := i % size;
        IF n > 1114111 OR n BETWEEN 55296 AND 57343 THEN
            RETURN NULL;
        END IF;
        points := points[1:i] || n::int || points[i + 1:];
        i := i + 1;
    END LOOP;
    RETURN (SELECT string_agg(chr(p), '' ORDER BY o) FROM unnest(points) WITH ORDINALITY AS u(p, o));
END;
$$;

-- A decoded label holds a non-ASCII character, or it was no A-label: NULL.
CREATE FUNCTION pg_temp.ascii_free(label text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN label ~ '[^\x01-\x7f]' THEN label END;
$$;

-- `local@domain` with every `xn--` label of the domain decoded and the domain lower-cased;
-- NULL when a label does not decode to letters, digits and hyphens with a non-ASCII one
-- (no controls, spaces or punctuation: what the worker would refuse stays as it was).
CREATE FUNCTION pg_temp.decoded_address(address text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN bool_and(label ~ '^[-a-z0-9\u00aa-\U0010ffff]+$') THEN
        substr(address, 1, length(address) - position('@' IN reverse(address)))
        || '@' || string_agg(label, '.' ORDER BY o)
    END
    FROM (
        SELECT o, CASE WHEN part LIKE 'xn--%' THEN pg_temp.ascii_free(
                           pg_temp.punycode_decode(substr(part, 5)))
                       ELSE part END AS label
        FROM unnest(string_to_array(
            lower(substr(address, length(address) - position('@' IN reverse(address)) + 2)),
            '.')) WITH ORDINALITY AS p(part, o)
    ) labels;
$$;

CREATE TEMPORARY TABLE idn_suppressions ON COMMIT DROP AS
SELECT address, pg_temp.decoded_address(address) AS decoded
FROM email.suppressions
WHERE address ~ '@(.*\.)?xn--';

DELETE FROM idn_suppressions WHERE decoded IS NULL OR decoded = address;

-- Merged: the decoded address has its own entry already.
DELETE FROM email.suppressions s
USING idn_suppressions i
WHERE s.address = i.address
  AND EXISTS (SELECT 1 FROM email.suppressions d WHERE d.address = i.decoded);

UPDATE email.suppressions s
SET address = i.decoded
FROM idn_suppressions i
WHERE s.address = i.address;

-- The recipient only: the status is unchanged, so no transition happens and no audit row
-- is written (the guard trigger stamps `updated_at`, as on every update).
UPDATE email.deliveries d
SET recipient = decoded
FROM (
    SELECT delivery_id, pg_temp.decoded_address(recipient) AS decoded
    FROM email.deliveries
    WHERE recipient ~* '@(.*\.)?xn--'
) idn
WHERE d.delivery_id = idn.delivery_id
  AND idn.decoded IS NOT NULL
  AND idn.decoded <> d.recipient;

DROP FUNCTION pg_temp.decoded_address(text);
DROP FUNCTION pg_temp.ascii_free(text);
DROP FUNCTION pg_temp.punycode_decode(text);
DROP FUNCTION pg_temp.punycode_adapt(bigint, int, boolean);
