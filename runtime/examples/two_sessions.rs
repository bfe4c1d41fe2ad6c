//! Two conversations decoded together through the split decode step, with an
//! explicit policy table: `cargo run --release --example two_sessions`
//! (after `scripts/setup.sh`, which installs the default model).

use tandem_runtime::chat::Message;
use tandem_runtime::policy::PolicyConfig;
use tandem_runtime::{default_model_path, Engine, EngineOptions, Flow, SamplingConfig};

fn main() -> Result<(), tandem_runtime::Error> {
    let options = EngineOptions {
        // MagicPIG's defaults, with a low threshold so that these short prompts
        // already move their older tokens to the CPU workers.
        policy: PolicyConfig {
            policy: "lsh:k=8,l=100,t=2".into(),
            window: 16,
            dense_below: 32,
            ..PolicyConfig::default()
        },
        ..EngineOptions::default()
    };
    let engine = Engine::load(&default_model_path(), &options)?;
    println!("policy table:\n{}", engine.policy_table());

    let questions = [
        "What is the capital of France? Answer in one sentence.",
        "Name three colours of the rainbow.",
    ];
    let mut prompts = Vec::new();
    for q in questions {
        let text = engine.render_chat(&[Message::user(q.to_string())])?;
        prompts.push(engine.tokenizer().encode(&text, false)?);
    }
    let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut first = engine.session()?;
    let mut second = engine.session()?;
    let mut replies = vec![String::new(); 2];
    let stats = engine.generate_batch(
        &mut [&mut first, &mut second],
        &prompt_refs,
        48,
        &SamplingConfig::default(),
        None,
        &mut |i, text| {
            replies[i].push_str(text);
            Flow::Continue
        },
    )?;
    for ((q, reply), s) in questions.iter().zip(&replies).zip(&stats) {
        println!("\n> {q}\n{reply}");
        println!(
            "({} tokens; waited {:.1} ms for the CPU workers)",
            s.generated_tokens,
            s.split.wait_ns as f64 / 1e6
        );
    }
    let (on_device, offloaded) = first.kv().layer_tokens(1);
    println!(
        "\nlayer 1 of the first session: {on_device} tokens on the device, {offloaded} offloaded"
    );
    Ok(())
}
