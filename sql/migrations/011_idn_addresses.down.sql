-- Back to the previous release's spelling: it reads only ASCII addresses, so every domain
-- stored in U-labels goes back to A-labels (`xn--…`, RFC 3492 Punycode) in suppression
-- entries and ledger recipients, where that release compares and finds them. An address
-- with a non-ASCII local part has no ASCII spelling and stays as it is. A suppression
-- whose A-label address already has an entry is merged into it.
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

-- One label's Punycode (without `xn--`).
CREATE FUNCTION pg_temp.punycode_encode(input text)
RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    points int[] := ARRAY(SELECT ascii(c) FROM regexp_split_to_table(input, '') AS c);
    output text := '';
    n bigint := 128;
    delta bigint := 0;
    bias int := 72;
    basic int := 0;
    handled int;
    m bigint;
    q bigint;
    k int;
    t int;
    c int;
BEGIN
    FOREACH c IN ARRAY points LOOP
        IF c < 128 THEN
            output := output || chr(c);
            basic := basic + 1;
        END IF;
    END LOOP;
    handled := basic;
    IF basic > 0 THEN
        output := output || '-';
    END IF;
    WHILE handled < cardinality(points) LOOP
        SELECT min(p) INTO m FROM unnest(points) AS p WHERE p >= n;
        delta := delta + (m - n) * (handled + 1);
        n := m;
        FOREACH c IN ARRAY points LOOP
            IF c < n THEN
                delta := delta + 1;
            ELSIF c = n THEN
                q := delta;
                k := 36;
                LOOP
                    t := CASE WHEN k <= bias THEN 1 WHEN k >= bias + 26 THEN 26 ELSE k - bias END;
                    EXIT WHEN q < t;
                    output := output || pg_temp.punycode_digit(t + (q - t) % (36 - t));
                    q := (q - t) / (36 - t);
                    k := k + 36;
                END LOOP;
                output := output || pg_temp.punycode_digit(q);
                bias := pg_temp.punycode_adapt(delta, handled + 1, handled = basic);
                delta := 0;
                handled := handled + 1;
            END IF;
        END LOOP;
        delta := delta + 1;
        n := n + 1;
    END LOOP;
    RETURN output;
END;
$$;

CREATE FUNCTION pg_temp.punycode_digit(d bigint)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT chr(CASE WHEN d < 26 THEN 97 + d ELSE 22 + d END::int);
$$;

-- `local@domain` with every non-ASCII label of the domain as its A-label.
CREATE FUNCTION pg_temp.encoded_address(address text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT substr(address, 1, length(address) - position('@' IN reverse(address)))
        || '@' || string_agg(
            CASE WHEN part ~ '^[\x01-\x7f]*$' THEN part
                 ELSE 'xn--' || pg_temp.punycode_encode(part) END,
            '.' ORDER BY o)
    FROM unnest(string_to_array(
        substr(address, length(address) - position('@' IN reverse(address)) + 2),
        '.')) WITH ORDINALITY AS p(part, o);
$$;

CREATE TEMPORARY TABLE idn_suppressions ON COMMIT DROP AS
SELECT address, pg_temp.encoded_address(address) AS encoded
FROM email.suppressions
WHERE address !~ '^[\x01-\x7f]*$'
  AND substr(address, 1, length(address) - position('@' IN reverse(address))) ~ '^[\x01-\x7f]*$';

DELETE FROM email.suppressions s
USING idn_suppressions i
WHERE s.address = i.address
  AND EXISTS (SELECT 1 FROM email.suppressions e WHERE e.address = i.encoded);

UPDATE email.suppressions s
SET address = i.encoded
FROM idn_suppressions i
WHERE s.address = i.address;

UPDATE email.deliveries d
SET recipient = pg_temp.encoded_address(d.recipient)
WHERE d.recipient !~ '^[\x01-\x7f]*$'
  AND substr(d.recipient, 1, length(d.recipient) - position('@' IN reverse(d.recipient)))
      ~ '^[\x01-\x7f]*$';

DROP FUNCTION pg_temp.encoded_address(text);
DROP FUNCTION pg_temp.punycode_encode(text);
DROP FUNCTION pg_temp.punycode_digit(bigint);
DROP FUNCTION pg_temp.punycode_adapt(bigint, int, boolean);
