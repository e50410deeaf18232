%% hook: a CPU-bound loop, the Erlang reference for hook.lua.
%% The BEAM always counts reductions, so there is no "without preemption"
%% run here; this only says how fast the same loops run on the BEAM.
%%
%% Args (key=value): n (iterations of each loop), reps (best of).
%% Two loops, like hook.lua: arithmetic only, and a call per iteration.
%% Figures in ms: hook (both loops), hook_arith, hook_calls.
-module(hook).
-export([main/0, main/1]).

main() -> main([]).

main(Args) ->
    N = arg(Args, "n", 20000000),
    Reps = arg(Args, "reps", 3),
    A = lists:min([time(fun() -> arith(N, 0) end) || _ <- lists:seq(1, Reps)]),
    C = lists:min([time(fun() -> calls(N, 0) end) || _ <- lists:seq(1, Reps)]),
    io:format("detail n=~b best of ~b: arith ~.1f ms, calls ~.1f ms~n", [N, Reps, A, C]),
    io:format("RESULT name=hook value=~.1f unit=ms~n", [A + C]),
    io:format("RESULT name=hook_arith value=~.1f unit=ms~n", [A]),
    io:format("RESULT name=hook_calls value=~.1f unit=ms~n", [C]),
    erlang:halt(0).

time(F) ->
    T0 = erlang:monotonic_time(microsecond),
    F(),
    (erlang:monotonic_time(microsecond) - T0) / 1000.

arith(0, X) -> X;
arith(I, X) -> arith(I - 1, (X * 3 + I) rem 1000003).

f(X) -> (X * 3 + 1) rem 1000003.

calls(0, X) -> X;
calls(I, X) -> calls(I - 1, f(X) + I rem 7).

arg([], _, Default) -> Default;
arg([A | Rest], Key, Default) ->
    case string:split(A, "=") of
        [Key, V] -> list_to_integer(V);
        _ -> arg(Rest, Key, Default)
    end.
