//! Dockerfiles: `matchlock build` parses the one in the build context, which is often someone
//! else's repository. The parser, the planner and every stage's instructions applied to an
//! empty config, with a build arg and each stage tried as the target.
//!
//! Checks, beyond not panicking: instruction lines are in the file and in order; a plan's
//! order ends with its target and lists each stage once, after the stages it uses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_build::dockerfile::parse;
use matchlock_build::plan::{plan, Base};
use matchlock_build::stage::{ImageConfig, StageState};
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(df) = parse(&text) else { return };
    let lines = text.split('\n').count();
    let mut last = 0;
    for i in &df.instructions {
        assert!(i.line > last && i.line <= lines, "line {} of {lines}", i.line);
        last = i.line;
    }
    let args: BTreeMap<String, String> = [("V".to_string(), "x y".to_string())].into();
    let Ok(p) = plan(&df, &args, None) else { return };
    let mut targets: Vec<Option<String>> = vec![None];
    targets.extend(p.stages.iter().filter_map(|s| s.name.clone()).map(Some));
    for t in targets {
        let Ok(p) = plan(&df, &args, t.as_deref()) else { continue };
        let mut seen = Vec::new();
        for &i in &p.order {
            assert!(!seen.contains(&i));
            if let Base::Stage(b) = p.stages[i].base {
                assert!(seen.contains(&b));
            }
            seen.push(i);
            let mut st = StageState::new(&p, i, ImageConfig::default(), &args);
            for inst in &p.stages[i].instructions {
                let _ = st.apply(inst);
            }
        }
    }
});
