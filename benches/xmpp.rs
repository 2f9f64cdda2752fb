//! Stanza round trips per second through a real XMPP server (Prosody on
//! loopback, started here): two Latus XMPP clients answer each other's
//! "changed" message in turn. `cargo bench --bench xmpp` (needs `prosody`).

#[allow(dead_code)] // the tests use the rest
#[path = "../tests/common/prosody.rs"]
mod prosody;
#[path = "../tests/common/xmpp_pair.rs"]
mod xmpp_pair;

const ROUND_TRIPS: u64 = 2000;
const RUNS: usize = 5;

fn main() {
    let server = prosody::Prosody::start();
    server.register("bench", "bench");
    let pair = xmpp_pair::Pair::online(&server, "bench", "bench");
    pair.round_trips(200); // warm-up
    let mut rates: Vec<f64> = (0..RUNS)
        .map(|_| ROUND_TRIPS as f64 / pair.round_trips(ROUND_TRIPS).as_secs_f64())
        .collect();
    rates.sort_by(f64::total_cmp);
    println!(
        "xmpp stanza round trips: median {:.0}/s over {RUNS} runs of {ROUND_TRIPS} (min {:.0}, max {:.0})",
        rates[RUNS / 2],
        rates[0],
        rates[RUNS - 1]
    );
}
