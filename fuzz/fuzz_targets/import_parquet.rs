#![no_main]
// The importer turns a panic inside the parquet crate into a message (catch_unwind); libFuzzer's
// hook would abort on that caught panic, so the default hook is put back. A panic that escapes
// the importer still aborts: libfuzzer-sys aborts when its own catch_unwind sees one.
libfuzzer_sys::fuzz_target!(
    init: {
        let _ = std::panic::take_hook();
    },
    |data: &[u8]| {
        moi_studio::fuzzing::run("import_parquet", data);
    }
);
