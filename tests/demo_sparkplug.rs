//! `plantgate demo --format sparkplug_b` end to end (docs/sparkplug.md):
//! the simulators, the embedded broker and the agent in Sparkplug mode,
//! with a broker outage; the demo's host view decodes every payload and
//! checks the message `seq` and every record's `epoch`/`seq`.

use std::time::Duration;

use plantgate::config::MqttFormat;
use plantgate::demo::{run, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_in_sparkplug_mode_without_loss() {
    let opts = DemoOptions {
        log_file: None,
        duration: Some(Duration::from_secs(14)),
        outage: Some(Duration::from_secs(3)),
        restart: None,
        format: MqttFormat::SparkplugB,
    };
    let summary = run(opts, tokio_util::sync::CancellationToken::new())
        .await
        .expect("the demo runs");
    assert!(summary.received > 50, "{summary:?}");
    assert_eq!(summary.gaps, 0, "no record lost: {summary:?}");
    assert_eq!(summary.sparkplug_seq_errors, 0, "{summary:?}");
    // NBIRTH and both DBIRTHs, then again after the outage.
    assert!(summary.sparkplug_births >= 6, "{summary:?}");
    assert!(summary.sparkplug_messages > 20, "{summary:?}");
}
