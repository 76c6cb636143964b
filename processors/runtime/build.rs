//! `sqlx::migrate!` embeds sql/ at compile time but does not tell cargo to watch the
//! directory: without this, a new migration file would not reach a cached build.
fn main() {
    println!("cargo:rerun-if-changed=../../sql");
}
