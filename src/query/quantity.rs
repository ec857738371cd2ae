//! `metered_quantity(text)`: a metered quantity in SQL, read by the parser the meter and
//! ingest use ([`crate::schema::quantity::parse_decimal`]).
//!
//! A `CAST(... AS DECIMAL(38, 10))` accepts other numbers than ingest does: it refuses
//! `1e-7`, which is what `JSON.stringify(0.0000001)` writes, and one such row failed every
//! query over `metered_events`. With one parser, SQL and the meter count the same rows: a
//! value the meter would skip (not a number, negative) is NULL here, and the view leaves
//! that row out as the meter does.

use std::sync::Arc;

use crate::schema::quantity::{MAX_QUANTITY_SCALE, parse_decimal};
use arrow::array::{Array, ArrayRef, AsArray, Decimal128Builder};
use arrow::datatypes::DataType;
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

/// The function's name in SQL.
pub(crate) const NAME: &str = "metered_quantity";

/// Precision of the quantities SQL answers: 38 digits, [`MAX_QUANTITY_SCALE`] of them decimals.
const PRECISION: u8 = 38;

/// Registers `metered_quantity` in `ctx`.
pub(crate) fn register(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::new_from_impl(MeteredQuantity {
        signature: Signature::string(1, Volatility::Immutable),
    }));
}

/// The quantity a meter counts for a value property's JSON text, as the SQL type of usage.
pub(crate) fn data_type() -> DataType {
    DataType::Decimal128(PRECISION, MAX_QUANTITY_SCALE as i8)
}

/// The quantity the meter counts for `text`, scaled to [`MAX_QUANTITY_SCALE`] places, or
/// `None` where the meter counts nothing (not a number, negative, out of range).
pub(crate) fn scaled(text: &str) -> Option<i128> {
    let amount = parse_decimal(text.trim())?;
    if amount.is_sign_negative() && !amount.is_zero() {
        return None;
    }
    let amount = amount.round_dp(MAX_QUANTITY_SCALE);
    let places = MAX_QUANTITY_SCALE.checked_sub(amount.scale())?;
    let scaled = amount.mantissa().checked_mul(10i128.checked_pow(places)?)?;
    (scaled < 10i128.pow(u32::from(PRECISION))).then_some(scaled)
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct MeteredQuantity {
    signature: Signature,
}

impl ScalarUDFImpl for MeteredQuantity {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(data_type())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [arg] = args.args.as_slice() else {
            return datafusion::common::exec_err!("{NAME} takes one argument");
        };
        let text = arg.to_array(args.number_rows)?;
        let text = arrow::compute::cast(&text, &DataType::Utf8)?;
        let text = text.as_string::<i32>();
        let mut out = Decimal128Builder::with_capacity(text.len());
        for value in text.iter() {
            out.append_option(value.and_then(scaled));
        }
        let out: ArrayRef = Arc::new(out.finish().with_data_type(data_type()));
        Ok(ColumnarValue::Array(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;

    fn unscaled(scaled: i128) -> Decimal {
        Decimal::from_i128_with_scale(scaled, MAX_QUANTITY_SCALE)
    }

    #[test]
    fn every_json_number_form_reads_as_the_meter_reads_it() {
        for (text, expected) in [
            ("1e-7", "0.0000001"),
            ("1E-7", "0.0000001"),
            ("1e+3", "1000"),
            ("1e3", "1000"),
            ("2.5E2", "250"),
            ("1e-05", "0.00001"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("0.0000000001", "0.0000000001"),
            ("12", "12"),
            (" 2.50 ", "2.5"),
        ] {
            let got = scaled(text).map(unscaled);
            assert_eq!(got, Some(expected.parse().unwrap()), "{text}");
        }
        for text in ["-1", "lots", "", "true", "{\"a\":1}", "1e400", "NaN"] {
            assert_eq!(scaled(text), None, "{text}");
        }
    }

    #[tokio::test]
    async fn sql_reads_exponents_that_a_cast_refuses() {
        let ctx = SessionContext::new();
        register(&ctx);
        let batches = ctx
            .sql(
                "SELECT sum(metered_quantity(v)) AS s, count(metered_quantity(v)) AS n \
                 FROM (VALUES ('1e-7'), ('0.5'), ('oops'), ('-2')) t(v)",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert!(text.contains("0.5000001000"), "{text}");
        assert!(text.contains("| 2 "), "{text}");
    }
}
