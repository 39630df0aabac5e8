//! The Redis tier's YAML settings: the request budget (`remote_timeout_ms`) and the values' shared
//! secret (`remote_auth_key`, or `remote_auth_key_env` naming the variable that holds it). A bad
//! secret is reported without its value.

use serde_json::{json, Value};
use xconnector_core::config::check_settings;

fn problems(config: Value) -> Vec<String> {
    let Value::Object(m) = config else { unreachable!() };
    check_settings("lmcache", &m, "a.config").into_iter().map(|p| format!("{}: {}", p.path, p.message)).collect()
}

#[test]
fn good_redis_settings_pass() {
    let ok = json!({"remote_url": "redis://r:6379", "remote_timeout_ms": 20, "remote_auth_key": "s3cret"});
    assert_eq!(problems(ok), Vec::<String>::new());
    let env = json!({"remote_timeout_ms": 60000, "remote_auth_key_env": "XCONNECTOR_REDIS_KEY"});
    assert_eq!(problems(env), Vec::<String>::new());
}

#[test]
fn a_budget_out_of_range_is_a_problem() {
    for bad in [json!(0), json!(-5), json!(60001), json!("20"), json!(2.5), json!(null)] {
        let got = problems(json!({ "remote_timeout_ms": bad }));
        assert_eq!(got, [format!("a.config.remote_timeout_ms: expected an integer from 1 to 60000, got {bad}")]);
    }
}

#[test]
fn a_bad_secret_is_a_problem_that_does_not_show_it() {
    assert_eq!(
        problems(json!({"remote_auth_key": ""})),
        ["a.config.remote_auth_key: the secret is empty; give a long random string"]
    );
    let got = problems(json!({"remote_auth_key": 987654321}));
    assert_eq!(got, ["a.config.remote_auth_key: expected a string (the secret), got a number"]);
    let got = problems(json!({"remote_auth_key": ["hunter2"]}));
    assert!(got.len() == 1 && !got[0].contains("hunter2"), "{got:?}");
    for bad in [json!(""), json!("A=B"), json!("$KEY"), json!(5)] {
        let got = problems(json!({ "remote_auth_key_env": bad }));
        assert!(got.len() == 1 && got[0].contains("expected the name of an environment variable"), "{got:?}");
    }
}
