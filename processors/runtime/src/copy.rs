//! Rows for `COPY ... FROM STDIN (FORMAT binary)`: the fastest way to append a batch's rows
//! (the outbox, logs) in the batch's transaction. Postgres parses no SQL and no arrays per
//! row; the binary format is what it stores for these types.
//!
//! Invariant: every row holds exactly the column count given to [`CopyRows::new`]; a row
//! built with another count is a bug in the caller, which Postgres refuses for the whole COPY
//! (the transaction then rolls back, nothing is half written). Rows are inserted in the order
//! they were added, so identity columns follow that order.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// Microseconds from the Unix epoch to 2000-01-01, Postgres' timestamp epoch.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A buffer of binary COPY rows.
pub struct CopyRows {
    buf: Vec<u8>,
    columns: i16,
    rows: u64,
}

impl CopyRows {
    /// An empty buffer for rows of `columns` columns.
    pub fn new(columns: i16) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        Self {
            buf,
            columns,
            rows: 0,
        }
    }

    /// Starts a row; follow it with exactly `columns` field calls.
    pub fn row(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&self.columns.to_be_bytes());
        self.rows += 1;
        self
    }

    /// Rows added so far.
    pub fn len(&self) -> u64 {
        self.rows
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        // A single field over 2 GiB cannot be sent by Postgres' protocol at all; the length
        // is saturated so Postgres refuses the COPY instead of misreading the stream.
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self
    }

    /// SQL NULL.
    pub fn null(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    /// An `integer`.
    pub fn int4(&mut self, v: i32) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    /// A `bigint`.
    pub fn int8(&mut self, v: i64) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    /// A nullable `bigint`.
    pub fn opt_int8(&mut self, v: Option<i64>) -> &mut Self {
        match v {
            Some(v) => self.int8(v),
            None => self.null(),
        }
    }

    /// A `text`.
    pub fn text(&mut self, v: &str) -> &mut Self {
        self.field(v.as_bytes())
    }

    /// A nullable `text`.
    pub fn opt_text(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    /// A `bytea`.
    pub fn bytea(&mut self, v: &[u8]) -> &mut Self {
        self.field(v)
    }

    /// A nullable `bytea`.
    pub fn opt_bytea(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            Some(v) => self.bytea(v),
            None => self.null(),
        }
    }

    /// A `jsonb` from JSON text (binary jsonb is a version byte, 1, then the text).
    pub fn jsonb(&mut self, json: &str) -> &mut Self {
        let len = i32::try_from(json.len() + 1).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.push(1);
        self.buf.extend_from_slice(json.as_bytes());
        self
    }

    /// A nullable `jsonb` from JSON text.
    pub fn opt_jsonb(&mut self, json: Option<&str>) -> &mut Self {
        match json {
            Some(j) => self.jsonb(j),
            None => self.null(),
        }
    }

    /// A `uuid`.
    pub fn uuid(&mut self, v: &Uuid) -> &mut Self {
        self.field(v.as_bytes())
    }

    /// A `timestamptz`.
    pub fn timestamptz(&mut self, v: DateTime<Utc>) -> &mut Self {
        self.int8(v.timestamp_micros() - PG_EPOCH_OFFSET_MICROS)
    }

    /// Sends the rows with `statement` (a `COPY ... FROM STDIN (FORMAT binary)`) on `conn`
    /// and returns the number of rows Postgres inserted.
    pub async fn copy_in(
        mut self,
        conn: &mut PgConnection,
        statement: &str,
    ) -> Result<u64, sqlx::Error> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
        let mut copy = conn.copy_in_raw(statement).await?;
        if let Err(e) = copy.send(self.buf).await {
            // Best effort: the connection reports the first error either way.
            let _ = copy.abort(e.to_string()).await;
            return Err(e);
        }
        copy.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_binary_copy_format() {
        let mut rows = CopyRows::new(3);
        rows.row().int4(7).text("é").null();
        rows.row()
            .int8(-1)
            .jsonb("{}")
            .timestamptz(DateTime::from_timestamp_micros(PG_EPOCH_OFFSET_MICROS + 5).unwrap());
        assert_eq!(rows.len(), 2);
        let b = &rows.buf;
        assert_eq!(&b[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(&b[11..19], &[0u8; 8]);
        // row 1: count 3; int4 len 4 = 7; text len 2 = "é"; NULL
        assert_eq!(&b[19..21], &3i16.to_be_bytes());
        assert_eq!(&b[21..29], &[0, 0, 0, 4, 0, 0, 0, 7]);
        assert_eq!(&b[29..35], &[0, 0, 0, 2, 0xc3, 0xa9]);
        assert_eq!(&b[35..39], &(-1i32).to_be_bytes());
        // row 2: bigint -1; jsonb = version 1 + "{}"; timestamp 5 µs after 2000-01-01
        assert_eq!(&b[39..41], &3i16.to_be_bytes());
        assert_eq!(
            &b[41..53],
            &[0, 0, 0, 8, 255, 255, 255, 255, 255, 255, 255, 255]
        );
        assert_eq!(&b[53..60], &[0, 0, 0, 3, 1, b'{', b'}']);
        assert_eq!(&b[60..72], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(b.len(), 72);
    }
}
