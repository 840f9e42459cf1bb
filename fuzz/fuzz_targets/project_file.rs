#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    moi_studio::fuzzing::run("project_file", data);
});
